"""Run infilling and revision evaluations on a model and summarise them.

Infilling methods are named `base[-modifier...]`: base is left | block | rank | fim; modifiers are
`wN` (suffix window N; `nosuffix` = w0), `cN` (candidates), `nodraft` (LoRA drafter off), and a mode
(`ar`, `spec`, `spec-quadratic`, `diffusion`) for fim and left. "left" ignores the suffix: it is the
baseline infilling must beat. Settings: `oracle` (the hole's true length in tokens) and, for
single-line holes, `stop` (up to `max_length` tokens, ending before a newline).

Human-eval holes pass when the completed program passes the problem's tests in the sandbox; every
hole is also graded by exact match (of the stripped lines).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from ..decoding.params import MODES, GenerationError
from .sandbox import Limits, run_python
from .tasks import InfillTask, RevisionTask

SETTINGS = ("oracle", "stop")


def method_kwargs(name: str) -> dict:
    """infill() keyword arguments for a method name such as "block-w8" or "fim-spec"."""
    base, *mods = name.split("-")
    if base not in ("left", "block", "rank", "fim"):
        raise ValueError(f"unknown infill method {name!r} (bases: left, block, rank, fim)")
    kw: dict = {"method": base, "mode": "diffusion" if base == "block" else "ar"}
    rest = "-".join(mods)
    for mode in sorted(MODES, key=len, reverse=True):  # "spec-quadratic" before "spec"
        if rest == mode or rest.endswith("-" + mode) or rest.startswith(mode + "-"):
            kw["mode"] = mode
            rest = rest.replace(mode, "").strip("-")
            break
    for m in filter(None, rest.split("-")):
        if m == "nosuffix":
            kw["suffix_window"] = 0
        elif m == "nodraft":
            kw["drafter"] = False
        elif m[0] == "w" and m[1:].isdigit():
            kw["suffix_window"] = int(m[1:])
        elif m[0] == "c" and m[1:].isdigit():
            kw["candidates"] = int(m[1:])
        else:
            raise ValueError(f"unknown modifier {m!r} in infill method {name!r}")
    return kw


def _strip_lines(s: str) -> str:
    return "\n".join(line.strip() for line in s.strip().split("\n"))


@dataclass
class InfillRecord:
    task_id: str
    kind: str
    method: str
    setting: str
    fills: list[str]
    exact: bool
    passed: bool | None  # None: no tests (stdlib)
    status: str | None
    seconds: float
    forwards: int


def trim_context(task: InfillTask, tokenizer, max_tokens: int) -> InfillTask:
    """A task without tests whose outer segments keep at most `max_tokens` tokens each (whole lines
    nearest the holes): for models trained on short rows. Tasks with tests are returned unchanged."""
    if task.test is not None or not max_tokens:
        return task
    segs = list(task.segments)
    while len(tokenizer.encode(segs[0])) > max_tokens and "\n" in segs[0][:-1]:
        segs[0] = segs[0][segs[0].index("\n") + 1:]
    while len(tokenizer.encode(segs[-1])) > max_tokens and "\n" in segs[-1][1:]:
        segs[-1] = segs[-1][:segs[-1].rindex("\n")]
    return InfillTask(task.task_id, task.kind, segs, task.answers, None, None)


def run_infill(model, tasks: list[InfillTask], methods: list[str], settings=SETTINGS, max_length: int = 48,
               limits: Limits | None = None, log=None, max_context: int | None = None) -> list[InfillRecord]:
    tok = model.tokenizer
    records = []
    for ti, task in enumerate(tasks):
        task = trim_context(task, tok, max_context)
        for setting in settings:
            if setting == "stop" and task.kind not in ("single-line", "stdlib-line"):
                continue
            for name in methods:
                kw = dict(method_kwargs(name), seed=0)
                if setting == "oracle":
                    kw["length"] = [len(tok.encode(a)) for a in task.answers]
                else:  # a hole that starts with a newline ends at the next one
                    kw.update(length=None, max_length=max_length, stop=["\n"],
                              stop_after=int(task.answers[0].startswith("\n")))
                t0 = time.perf_counter()
                try:
                    r = model.infill(segments=task.segments, **kw)
                except GenerationError as e:  # longer than the model's context: not counted
                    if log:
                        log(f"[{ti + 1}/{len(tasks)}] {task.task_id} skipped: {e}")
                    continue
                secs = time.perf_counter() - t0
                exact = all(_strip_lines(f) == _strip_lines(a) for f, a in zip(r.fills, task.answers, strict=True))
                status = None
                if task.test is not None:
                    status = "passed" if exact and _verbatim(r.fills, task.answers) else \
                        run_python(task.program(r.fills), limits).status
                records.append(InfillRecord(task.task_id, task.kind, name, setting, r.fills, exact,
                                            None if status is None else status == "passed", status, secs,
                                            r.metrics.forwards + r.metrics.prefill_forwards))
                if log:
                    log(f"[{ti + 1}/{len(tasks)}] {task.kind} {task.task_id} {setting} {name}: "
                        f"{'pass' if records[-1].passed else 'exact' if exact else 'miss'} ({secs:.1f} s)")
    return records


def _verbatim(fills: list[str], answers: list[str]) -> bool:
    """The fill reproduces the canonical text exactly: the tests would pass, no need to run them."""
    return all(f == a for f, a in zip(fills, answers, strict=True))


def summarise_infill(records: list[InfillRecord]) -> list[dict]:
    groups: dict[tuple, list[InfillRecord]] = defaultdict(list)
    for r in records:
        groups[(r.kind, r.setting, r.method)].append(r)
    rows = []
    for (kind, setting, method), rs in groups.items():
        tested = [r for r in rs if r.passed is not None]
        rows.append({"kind": kind, "setting": setting, "method": method, "n": len(rs),
                     "pass_rate": sum(r.passed for r in tested) / len(tested) if tested else None,
                     "exact_match": sum(r.exact for r in rs) / len(rs),
                     "seconds_per_task": sum(r.seconds for r in rs) / len(rs),
                     "forwards_per_task": sum(r.forwards for r in rs) / len(rs)})
    return rows


# -- revision ---------------------------------------------------------------------------------------------------
@dataclass
class RevisionRecord:
    task_id: str
    kind: str
    setting: str
    length: int  # tokens that could be revised
    planted: int
    fixed: int  # planted positions restored to the original token
    broken: int  # originally correct positions changed
    detected: int  # planted positions re-masked in some round
    selected: int  # positions re-masked, all rounds
    seconds: float


@dataclass
class RevisionSetting:
    name: str
    rounds: int = 1
    threshold: float | None = None
    budget: str | float | int | None = None  # "planted": as many as were planted
    extra: dict = field(default_factory=dict)

    def kwargs(self, task: RevisionTask) -> dict:
        budget = len(task.planted) if self.budget == "planted" else self.budget
        return dict(rounds=self.rounds, threshold=self.threshold, budget=budget, **self.extra)


DEFAULT_REVISION_SETTINGS = (
    RevisionSetting("budget = planted, 1 round", budget="planted"),
    RevisionSetting("budget = planted, 2 rounds", rounds=2, budget="planted"),
    RevisionSetting("budget = planted, min_gain 4", budget="planted", extra={"min_gain": 4.0}),
    RevisionSetting("defaults (p < 0.1, at most 10%)"),
    RevisionSetting("defaults, min_gain 4", extra={"min_gain": 4.0}),
    RevisionSetting("threshold 0.01, min_gain 4", threshold=0.01, extra={"min_gain": 4.0}),
)


def run_revision(model, tasks: list[RevisionTask], settings=DEFAULT_REVISION_SETTINGS,
                 log=None) -> list[RevisionRecord]:
    records = []
    for ti, task in enumerate(tasks):
        planted = set(task.planted)
        for s in settings:
            t0 = time.perf_counter()
            r = model.revise(task.corrupted, prefix=task.context, **s.kwargs(task))
            secs = time.perf_counter() - t0
            chosen = {p for rnd in r.selected for p in rnd}
            fixed = sum(r.ids[p] == task.original[p] for p in planted)
            broken = sum(r.ids[i] != task.original[i] for i in range(len(task.original)) if i not in planted)
            records.append(RevisionRecord(task.task_id, task.kind, s.name, len(task.original), len(planted), fixed,
                                          broken,
                                          len(chosen & planted), len(chosen), secs))
            if log:
                log(f"[{ti + 1}/{len(tasks)}] {task.kind} {s.name}: fixed {fixed}/{len(planted)}, broke {broken}")
    return records


def summarise_revision(records: list[RevisionRecord]) -> list[dict]:
    groups: dict[tuple, list[RevisionRecord]] = defaultdict(list)
    for r in records:
        groups[(r.setting, r.kind)].append(r)
        groups[(r.setting, "all")].append(r)
    rows = []
    for (setting, kind), rs in groups.items():
        planted = sum(r.planted for r in rs)
        correct = sum(r.length - r.planted for r in rs)
        broken = sum(r.broken for r in rs)
        rows.append({"setting": setting, "kind": kind, "tasks": len(rs), "planted": planted,
                     "fixed": sum(r.fixed for r in rs), "broken": broken, "correct_tokens": correct,
                     "detected": sum(r.detected for r in rs), "selected": sum(r.selected for r in rs),
                     "fixed_rate": sum(r.fixed for r in rs) / max(1, planted), "broken_rate": broken / max(1, correct),
                     "seconds_per_task": sum(r.seconds for r in rs) / len(rs)})
    return rows


def records_to_json(records) -> list[dict]:
    return [asdict(r) for r in records]
