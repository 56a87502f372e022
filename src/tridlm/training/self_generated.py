"""Training text written by the model itself: prompts like the ones it serves, answered by its AR mode.

A drafter (diffusion passes, self-speculation drafts) is judged by how often it guesses what the
model's own causal pass will write. Corpus text teaches that only indirectly -- the causal pass rarely
writes the corpus's next token -- so this module builds a corpus of the model's greedy answers
(sequence-level self-distillation): GSM8K *train* questions as chats, Python functions from the
standard library cut after their docstring (the shape of a HumanEval prompt), and story openings
made from word lists (none is a benchmark prompt). Chats are written as ``messages`` records (the
trainer scores the answer only), completions as ``text`` records. The file is appended to record by
record and a rerun skips the ids already there, so generation can be stopped and resumed.
"""

from __future__ import annotations

import ast
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..bench.prompts import GSM8K_INSTRUCTION, Prompt
from .corpora import DEFAULT_GSM8K, stdlib_files

# story openings: a character, a place and a first event, never one of the benchmark's openings
_WHO = ["an old fisherman", "a young girl named Ana", "a shy robot", "a retired astronaut", "two brothers",
        "a clever fox", "the village baker", "a lonely giant", "a travelling musician", "a small brown dog",
        "a boy who could not sleep", "the queen's gardener", "a curious owl", "a tired detective",
        "an inventor named Theo", "three friends", "a ghost who was afraid of the dark", "a lost kitten",
        "the last dragon", "a schoolteacher named Mrs. Green", "a painter", "a girl with a red umbrella",
        "an elephant", "a postman", "a pirate captain", "a young witch", "a farmer and his daughter"]
_WHERE = ["in a quiet mountain village", "on a crowded train", "at the bottom of the sea", "in a city of glass",
          "on a tiny island", "in an old library", "deep in the jungle", "on the moon", "in a snowy forest",
          "at a busy market", "in a house at the end of the street", "on a ship far from land",
          "in a castle made of sand", "in the desert", "at a school for wizards", "in a small bakery"]
_WHAT = ["found a strange map", "heard a knock at midnight", "lost something precious",
         "made an unlikely friend", "discovered a hidden door", "received a mysterious letter",
         "had to make a difficult choice", "saw a light in the sky", "decided to run away",
         "was given a magic seed", "woke up with a new power", "broke a promise"]
_STORY_FRAMES = ["Once upon a time, {who} {where} {what}.", "It was a cold morning when {who} {where} {what}.",
                 "Nobody expected that {who} {where} would be the one who {what}.",
                 "Long ago, {who} lived {where}. One day, {who2}"]


def story_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` story prompts, half completions of an opening and half chat requests for a short story."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        who, where, what = rng.choice(_WHO), rng.choice(_WHERE), rng.choice(_WHAT)
        if i % 2 == 0:
            frame = rng.choice(_STORY_FRAMES)
            text = frame.format(who=who, where=where, what=what, who2="they")
            if frame.endswith("{who2}"):
                text = text[:-len("they")] + ("the " + who.split()[-1] if who.startswith(("a ", "an ")) else who)
            text = text[0].upper() + text[1:]
            out.append(Prompt(f"story/{i}", text, "story"))
        else:
            out.append(Prompt(f"story/{i}", f"Write a short story about {who} {where} who {what}.", "story", True))
    return out


def gsm8k_train_prompts(n: int, path: Path = DEFAULT_GSM8K) -> list[Prompt]:
    """The first `n` GSM8K *train* questions, framed as the benchmark frames test questions."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if len(out) >= n:
                break
            q = json.loads(line)["question"]
            out.append(Prompt(f"gsm8k/{i}", GSM8K_INSTRUCTION + q, "gsm8k", True))
    return out


def _function_prompts(path: Path) -> Iterator[str]:
    """Module-level functions of one source file, cut after their docstring (HumanEval's shape)."""
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = src.splitlines()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or not node.body:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)) or len(node.body) < 2:
            continue
        if not 40 <= len(doc.value.value) <= 800:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        yield "\n".join(lines[start - 1:doc.end_lineno]) + "\n"


def code_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` Python functions of the standard library, each cut after its docstring, in a seeded order."""
    found = [p for f in stdlib_files() if f.suffix == ".py" for p in _function_prompts(f)]
    random.Random(seed).shuffle(found)
    return [Prompt(f"code/{i}", p, "code") for i, p in enumerate(found[:n])]


def mixed_prompts(n_gsm8k: int, n_code: int, n_stories: int, seed: int = 0,
                  gsm8k_path: Path = DEFAULT_GSM8K) -> list[Prompt]:
    """The three kinds interleaved, so a run stopped early still has some of each."""
    sets = [gsm8k_train_prompts(n_gsm8k, gsm8k_path) if n_gsm8k else [], code_prompts(n_code, seed),
            story_prompts(n_stories, seed)]
    out = []
    for i in range(max(map(len, sets))):
        out += [s[i] for s in sets if i < len(s)]
    return out


def _record(p: Prompt, completion: str) -> dict:
    if p.chat:
        return {"id": p.id, "messages": [{"role": "user", "content": p.text},
                                         {"role": "assistant", "content": completion}]}
    return {"id": p.id, "text": p.text + completion}


def done_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    ids = set()
    with open(path) as f:
        for line in f:
            if line.strip():
                ids.add(json.loads(line)["id"])
    return ids


@torch.inference_mode()
def write_corpus(hf_model, tokenizer, prompts: list[Prompt], out: Path, max_new_tokens: int = 256,
                 batch_size: int = 64, budget_s: float | None = None, log=print) -> dict:
    """Answer `prompts` greedily with `hf_model` (a transformers causal LM; batched, left-padded; at most
    `max_new_tokens` each) and append one JSONL record per prompt to `out`. Stops starting new batches
    after `budget_s` seconds."""
    t0 = time.perf_counter()
    done = done_ids(out)
    todo = [p for p in prompts if p.id not in done]
    eos = tokenizer.eos_id
    pad = hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None else eos
    stats = {"records": 0, "generated_tokens": 0, "skipped": len(prompts) - len(todo)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
            batch = todo[b:b + batch_size]
            enc = [p.encode(tokenizer) for p in batch]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            att = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):  # left padding: every row's next token sits at the same column
                ids[i, width - len(e):] = torch.tensor(e)
                att[i, width - len(e):] = 1
            new = hf_model.generate(ids.to(hf_model.device), attention_mask=att.to(hf_model.device),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None,
                                    top_k=None)[:, width:].tolist()
            for p, row in zip(batch, new, strict=True):
                if eos in row:
                    row = row[:row.index(eos)]
                stats["generated_tokens"] += len(row)
                f.write(json.dumps(_record(p, tokenizer.decode(row))) + "\n")
                stats["records"] += 1
            f.flush()
            log(f"self-generated {stats['records']} records, {stats['generated_tokens']} tokens, "
                f"{time.perf_counter() - t0:.0f} s")
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    return stats
