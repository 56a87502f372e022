"""Stepping many rows, of any modes, through one forward per step over a shared KV cache.

`DecodeBatch.step()` asks each live row's mode for a `Plan`, pads the plans into one forward
(per-row positions, per-row attention patterns, padding marked by `valid`, only the requested
logits computed), then hands each row its logits and applies the cache entries it keeps. Rows may
join (`add`) and leave (`remove`; finished rows leave by themselves) between steps.
`step_together(batches)` steps several batches in one forward, each padded only to its own widest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..masks import new_token_mask
from .row import Plan, Row


class DecodeBatch:
    def __init__(self, model, rows=()):
        self.model = model
        self.rows: list[Row] = []
        # the rows' KV entries: `cache` is row i's view over slot i of `_store`, which keeps room for more
        # rows than it holds, so rows join and leave without a copy of everyone's entries
        self._store: KVCache | None = None
        self.cache: KVCache | None = None
        self.prefill_forwards = 0  # model calls in which every row prefilled
        self.forwards = 0  # the other model calls
        self.add(*rows)

    # -- membership ------------------------------------------------------------------------------
    def add(self, *rows: Row) -> None:
        rows = [r for r in rows if not r.finished]
        if not rows:
            return
        dev = self.model.device
        for r in rows:  # a row samples with its own generator, which lives on one device
            other_index = None not in (r.device.index, dev.index) and r.device.index != dev.index
            if r.device.type != dev.type or other_index:
                raise ValueError(f"a row built for {r.device} cannot join a batch on {dev}: "
                                 f"pass device=model.device to Row")
        need = max(len(r.prompt) + r.limit + r.mode.scratch(r.params) for r in rows)
        n = len(self.rows)
        self._resize(n + len(rows), need)
        self._store.lengths[n:n + len(rows)] = 0
        for r in rows:
            r.cached = 0
        self.rows.extend(rows)
        self.cache = self._store.rows(0, len(self.rows))

    def remove(self, *rows: Row) -> None:
        """Take rows out, copying a few rows' entries rather than the batch's: the last row that has prefilled
        moves into a leaving row's slot, and the rows still prefilling after it (rows join at the end) move
        down one slot each, so they stay last and their prompt chunks stay a call of their own."""
        gone = {id(r) for r in rows}
        holes = [i for i, r in enumerate(self.rows) if id(r) in gone]
        if not holes:
            return
        for i in reversed(holes):  # from the back: every row after i stays
            n = len(self.rows)
            tail = n
            while tail > i + 1 and not self.rows[tail - 1].prefilled:
                tail -= 1  # rows [tail, n) are still prefilling
            hole = i
            if tail - 1 > i:
                self._move(tail - 1, i)
                hole = tail - 1
            for t in range(hole + 1, n):
                self._move(t, t - 1)
            self.rows.pop()
        if not self.rows:
            self._store = self.cache = None
        else:
            self.cache = self._store.rows(0, len(self.rows))

    def _move(self, src: int, dst: int) -> None:
        """Row src's entries and row object into slot dst."""
        s = self._store
        used = int(s.lengths[src])
        s.k[:, dst, :, :used] = s.k[:, src, :, :used]
        s.v[:, dst, :, :used] = s.v[:, src, :, :used]
        s.lengths[dst] = used
        self.rows[dst] = self.rows[src]

    def _resize(self, n_rows: int, max_len: int) -> None:
        """Room for n_rows rows of max_len positions; more rows than are asked for when rows are added to
        rows that hold entries (half as many again), so that the next ones that join fit."""
        old = self._store
        if old is not None and old.batch_size >= n_rows and old.max_len >= max_len:
            return
        b = len(self.rows)
        if old is not None and b and n_rows > old.batch_size:
            n_rows = max(n_rows, old.batch_size + old.batch_size // 2)
        new = self.model.new_cache(max(n_rows, old.batch_size if old is not None else 0),
                                   max(max_len, old.max_len if old is not None else 0))
        if old is not None and b:  # keep the live rows' entries (rows joining mid-run)
            n = old.max_len
            new.k[:, :b, :, :n] = old.k[:, :b]
            new.v[:, :b, :, :n] = old.v[:, :b]
            new.lengths[:b] = old.lengths[:b]
        self._store = new
        self.cache = new.rows(0, b) if b else None

    @property
    def done(self) -> bool:
        return not self.rows

    # -- one step ------------------------------------------------------------------------------------
    def step(self) -> list[Row]:
        """One forward for every live row; returns the rows stepped (finished ones have left)."""
        done = step_together([self])[0]
        return done.rows if done is not None else []

    def prepare(self) -> BatchStep | None:
        """Plan this step: every live row's part, padded into calls of the model's forward -- one, or two
        when the rows still prefilling (new rows join at the end) follow rows that decode: a prompt chunk
        is then not a width every decoding row is padded to."""
        rows = list(self.rows)
        if not rows:
            return None
        plans = [r.mode.plan(r) for r in rows]
        first = next((i for i, p in enumerate(plans) if p.prefill), len(plans))
        split = 0 < first < len(plans) and all(p.prefill for p in plans[first:])
        spans = [(0, first), (first, len(plans))] if split else [(0, len(plans))]
        writing = [max(p.size for p in plans[a:b]) for a, b in spans if any(p.write for p in plans[a:b])]
        if writing:  # padding makes every row write T slots: a row near its end may need more than it asked for
            self._resize(len(rows), int(self.cache.lengths.max()) + max(writing))
        calls = [self._call(plans[a:b], self.cache if not split else self.cache.rows(a, b)) for a, b in spans]
        return BatchStep(self, rows, plans, spans, calls)

    def finish(self, step: BatchStep, outs: list[torch.Tensor]) -> list[Row]:
        """Hand each row its logits from the outputs of the step's calls and keep the cache entries it keeps."""
        rows, plans = step.rows, step.plans
        logits = [lg for (a, b), call, out in zip(step.spans, step.calls, outs, strict=True)
                  for lg in self._logits(plans[a:b], out, call["return_hidden"])]
        for i, (r, p, lg) in enumerate(zip(rows, plans, logits, strict=True)):
            base = r.cached
            keep = r.mode.consume(r, p, lg)
            if p.prefill:
                r.metrics.prefill_forwards += 1
            else:
                r.metrics.forwards += 1
            if not p.write:
                continue
            if keep is None:
                r.cached = base + p.size
            elif isinstance(keep, int):
                r.cached = base + keep
            else:  # compaction: the kept entries move to the front of what this forward wrote
                self.cache.keep(i, base, base + keep.to(self.cache.lengths.device))
                r.cached = base + keep.numel()
        self.cache.crop(torch.tensor([r.cached for r in rows], device=self.cache.lengths.device))
        if all(p.prefill for p in plans):
            self.prefill_forwards += 1
        else:
            self.forwards += 1
        self.remove(*[r for r in rows if r.finished])
        return rows

    def _call(self, plans: list[Plan], cache: KVCache) -> dict:
        """The model forward's arguments for these plans (rows of `cache`), padded to the widest."""
        dev = self.model.device
        B = len(plans)
        sizes = [p.size for p in plans]
        T = max(sizes)
        ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        pos = torch.zeros(B, T, dtype=torch.long, device=dev)
        valid = torch.zeros(B, T, dtype=torch.bool, device=dev)
        draft = torch.zeros(B, T, dtype=torch.bool, device=dev)
        K = max(1, max(p.logits_at.numel() for p in plans))
        at = torch.zeros(B, K, dtype=torch.long, device=dev)
        for i, p in enumerate(plans):
            t = sizes[i]
            ids[i, :t], pos[i, :t], valid[i, :t], draft[i, :t] = p.tokens, p.positions, True, p.draft
            at[i, :p.logits_at.numel()] = p.logits_at
        names = {p.pattern for p in plans if isinstance(p.pattern, str)}
        if len(names) == 1 and all(isinstance(p.pattern, str) for p in plans):
            pattern = names.pop()
        else:  # rows want different patterns: one explicit [B, T, T] mask
            pattern = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
            for i, p in enumerate(plans):
                pattern[i, :sizes[i], :sizes[i]] = new_token_mask(p.pattern, sizes[i], device=dev)
        return dict(input_ids=ids, positions=pos, cache=cache, pattern=pattern, write_cache=any(p.write for p in plans),
                    valid=None if bool(valid.all()) else valid, logits_at=at, draft=draft,
                    return_hidden=any(p.lazy_logits for p in plans))

    def _logits(self, plans: list[Plan], out: torch.Tensor, hidden: bool) -> list:
        """Each row's logits from a call's output (final hidden states where `hidden`: the head runs here, in
        one product for the rows that want all their logits -- a head product per row would read the head's
        weights once per row -- and on indexing for the others)."""
        rows = [out[i, :p.logits_at.numel()] for i, p in enumerate(plans)]
        if not hidden:
            return rows
        whole = [h for h, p in zip(rows, plans, strict=True) if not p.lazy_logits]
        logits = iter(self.model.logits(torch.cat(whole)).split([h.shape[0] for h in whole]) if whole else ())
        return [LazyLogits(h, self.model.logits) if p.lazy_logits else next(logits)
                for h, p in zip(rows, plans, strict=True)]


@dataclass
class BatchStep:
    """A batch's share of one step: its rows, their plans, and its calls of the model's forward (`calls[j]`
    for rows `spans[j]`)."""

    batch: DecodeBatch
    rows: list[Row]
    plans: list[Plan]
    spans: list[tuple[int, int]]
    calls: list[dict]

    @property
    def tokens(self) -> int:
        """The tokens its forward computes, padding included."""
        return sum(c["input_ids"].numel() for c in self.calls)


def step_together(batches: list[DecodeBatch]) -> list[BatchStep | None]:
    """One step of every batch in one forward (`TriModeLM.forward_many`): the batches' tokens share the
    products, each batch's rows attend over its own cache, so batches of different widths move on
    together without padding the narrow rows to the widest. Returns each batch's step (its rows, their
    plans, its tokens), None for a batch that had no rows."""
    steps = [b.prepare() for b in batches]
    live = [s for s in steps if s is not None]
    if live:
        outs = iter(live[0].batch.model.forward_many([c for s in live for c in s.calls]))
        for s in live:
            s.batch.finish(s, [next(outs) for _ in s.calls])
    return steps


class LazyLogits:
    """Logits computed on indexing, from final hidden states [k, H] (`head`: TriModeLM.logits): a plan that
    reads only a few of many positions (quadratic self-speculation) skips the head -- and a [k, V] tensor
    -- elsewhere."""

    def __init__(self, hidden: torch.Tensor, head):
        self.hidden, self.head = hidden, head

    def __getitem__(self, index) -> torch.Tensor:
        return self.head(self.hidden[index])

    def __len__(self) -> int:
        return self.hidden.shape[0]
