"""Rows whose forwards are written as a script: a generator that yields `Plan`s and receives logits.

Infilling and revision need sequences of forwards that no single mode makes (prefill a prefix,
denoise a block that holds given suffix tokens, commit, score candidates side by side, crop back).
Writing them as a generator keeps each procedure readable top to bottom, while the row still obeys
the batch contract: `DecodeBatch` calls `plan(row)` and `consume(row, plan, logits)` as for any mode,
so these rows batch with AR, diffusion and self-speculation rows (each row sees only its own cache).

A script yields a `Plan` and gets that plan's logits back. After a write plan the row's cache holds
everything the plan wrote unless the script then calls `row.keep(n)` (the first n); `row.crop_to(n)`
drops back to n entries, possibly fewer than before the plan. `row.cache_len` is always the number of
entries the next plan sees (the batch applies keeps and crops at the end of the step).
A script may also run a whole inner `Row` (any mode) on the row's cache with `yield from run_row(...)`.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from .row import Mode, Plan, Row

Script = Generator[Plan, torch.Tensor, None]


class ScriptedMode(Mode):
    """Runs `row.script()`; stateless like every mode (the generator lives on the row)."""

    name = "scripted"

    def start(self, row: Row) -> None:
        pass

    def scratch(self, params) -> int:
        return params.block_length + 1  # the batch grows its cache on demand for writes anyway

    def plan(self, row: ScriptRow) -> Plan:
        if row.cached != row.cache_len:
            raise RuntimeError(f"scripted row: the batch holds {row.cached} cache entries for it, the script "
                               f"expected {row.cache_len}")
        return row.pending

    def consume(self, row: ScriptRow, plan: Plan, logits: torch.Tensor):
        base = row.cache_len
        row._base, row._compact = base, None
        if plan.write:
            row.cache_len = base + plan.size  # what the batch keeps unless the script says otherwise
        row.pending = row._advance(logits)
        if row._compact is not None:  # compaction (an inner spec-quadratic row): the batch moves the entries
            return row._compact
        if not plan.write:
            row.cached = row.cache_len  # the batch crops a read-only row to `cached`
            return None
        return row.cache_len - base  # may be negative: a crop below what the row held before this plan


class ScriptRow(Row):
    """A `Row` driven by `script()`; subclasses write the script and set their results."""

    def __init__(self, prompt_ids, params, config, tokenizer=None, seed=None, device=None):
        super().__init__(prompt_ids, params, config, tokenizer, seed, device)
        self.mode = ScriptedMode()
        self.state = None
        self.cache_len = 0
        self._base = 0
        self._compact: torch.Tensor | None = None
        self.pending: Plan | None = None
        self.finished, self.finish_reason = False, None  # `Row` may have finished it for its own limit
        self._gen = self.script()
        self.pending = self._advance(None)

    # -- for the script ---------------------------------------------------------------------------
    def script(self) -> Script:
        raise NotImplementedError

    def keep(self, n) -> None:
        """Keep only the first n entries the plan just run wrote (an index tensor: those entries)."""
        if isinstance(n, torch.Tensor):
            self._compact = n
            n = n.numel()
        self.cache_len = self._base + int(n)

    def crop_to(self, n: int) -> None:
        """Hold only the first n cache entries from the next plan on (never more than now)."""
        if n > self.cache_len:
            raise RuntimeError(f"crop_to({n}) cannot grow the cache beyond {self.cache_len} entries")
        if self._compact is not None and n != self.cache_len:
            if n > self._base:
                raise RuntimeError("a step cannot both compact and crop into what it wrote")
            self._compact = None  # everything the step wrote goes anyway
        self.cache_len = n

    # -- internals ---------------------------------------------------------------------------------
    def _advance(self, logits) -> Plan | None:
        try:
            return next(self._gen) if logits is None else self._gen.send(logits)
        except StopIteration:
            if not self.finished:
                self.finish("length")
            return None


def run_row(outer: ScriptRow, inner: Row, until=None) -> Script:
    """Step `inner` (any mode) on `outer`'s cache until it finishes -- or, with `until`, until
    until(inner.output) is true (it then finishes with reason "stop"); the caller reads its output.

    The inner row must start with the entries `outer` holds (normally none): its own `cached` is kept
    in step with what the batch would do for it.
    """
    inner.cached = outer.cache_len
    while not inner.finished:
        plan = inner.mode.plan(inner)
        logits = yield plan
        base = inner.cached
        keep = inner.mode.consume(inner, plan, logits)
        if plan.write:
            if keep is None:
                inner.cached = base + plan.size
                outer.keep(plan.size)
            elif isinstance(keep, int):
                inner.cached = base + keep
                outer.keep(keep)
            else:
                inner.cached = base + keep.numel()
                outer.keep(keep)
        if until is not None and not inner.finished and until(inner.output):
            inner.finish("stop")
