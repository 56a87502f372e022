"""The worker thread's hands: the `DecodeBatch`es over the model, stepped while they hold rows.

Rows are batched with rows of the same forward width (a power-of-two class of `forward_width`: AR
rows together, blocks of 8 together, ...), because a batch pads every row to its widest plan: one
spec-quadratic row beside fifteen AR rows would make each of them compute a thousand tokens. Batches
of different widths still share forwards (`step_together`: one pass over the weights for all their
tokens, attention batch by batch), as far as that slows every row down alike: each forward moves each
of its rows on by what that forward costs one row alone (measured whenever the batch holds one row;
until then, the row's share of the forward's time), the batch whose rows have moved on least leads
the next forward (a batch that was idle starts level with the others), and every batch the forward
would not carry past the leader joins it. AR rows and diffusion blocks then step together every time,
while a 10 ms AR step is not held to one per second-long spec-quadratic step: that batch joins one AR
forward in a hundred. Prompts prefill in chunks of `prefill_chunk` tokens so that no single forward
holds the others up for long.

Admitted requests' rows join between steps; after each step what every row made final goes out as
its request's events, and a request whose rows have all finished is handed back to the scheduler. A
failing step fails only the requests in its batches; the next ones get fresh batches.
"""

from __future__ import annotations

import logging
import time

from ..decoding import DecodeBatch
from ..decoding.batch import step_together
from ..decoding.params import forward_width
from .request import AUTO, Delta, Finished, Outbox, Request
from .scheduler import Scheduler

log = logging.getLogger("tridlm.engine")


def width_class(req: Request) -> int:
    """The batch a request's rows join: its decode forwards' width, rounded up to a power of two."""
    w = forward_width(req.mode, req.block_length) if isinstance(req.block_length, int) else 1
    return 1 << (max(1, w) - 1).bit_length()


class Runner:
    """Owns the batches; only the engine's worker thread calls it."""

    def __init__(self, model, scheduler: Scheduler, prefill_chunk: int | None = None, clock=time.perf_counter,
                 step_batches=step_together):
        self.model = model
        self.clock = clock  # what forward time is measured with
        self.step_batches = step_batches  # batches -> their steps (`.tokens`), in one forward
        self.scheduler = scheduler
        self.prefill_chunk = prefill_chunk
        self.batches: dict[int, DecodeBatch] = {}  # width class -> its batch
        self.busy: dict[int, float] = {}  # width class -> its rows' progress while it held rows, in solo seconds
        self.solo: dict[int, float] = {}  # width class -> seconds of a one-row decode forward (running mean)
        self.pace: dict[int, float] = {}  # width class -> how far its last forward moved each of its rows on
        self.auto_block: int | None = None  # what block_length="auto" resolved to, once it was needed

    # -- what the scheduler reads and asks -----------------------------------------------------------------
    @property
    def row_count(self) -> int:
        return sum(len(b.rows) for b in self.batches.values())

    @property
    def idle(self) -> bool:
        return all(b.done for b in self.batches.values())

    def remove(self, rows) -> None:
        """Take rows out of whichever batch holds them (frees their cache entries)."""
        for b in self.batches.values():
            b.remove(*rows)

    # -- the worker's steps ------------------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Put the request's rows into the batch of their width (resolving block_length="auto" first)."""
        try:
            if req.block_length == AUTO:
                block = self.resolve_auto_block()
                req.rows = req.rebuild_rows(block)
                req.block_length = block
            for r in req.rows:
                r.prefill_chunk = self.prefill_chunk
            key = width_class(req)
            if key not in self.batches:
                self.batches[key] = DecodeBatch(self.model)
            self.batches[key].add(*req.rows)
        except Exception as e:
            log.exception("admitting request %d failed", req.id)
            self.scheduler.fail(req, f"could not start decoding: {e}")
            return
        self.deliver(req)  # rows that finished before any forward (no room left in the context)

    def resolve_auto_block(self) -> int:
        """Times forwards on first use, so it runs here, in the worker thread, and only once."""
        if self.auto_block is None:  # what generate() uses for block_length="auto"
            from ..generate import auto_block_length

            self.auto_block = int(auto_block_length(self.model))
            log.info("block_length auto -> %d", self.auto_block)
        return self.auto_block

    def step(self) -> None:
        """One forward for the batches whose turn it is (`participants`), then deliver what it made final."""
        live = [k for k in sorted(self.batches) if not self.batches[k].done]
        if not live:
            return
        keys = self.participants(live)
        batches = [self.batches[k] for k in keys]
        sizes = [len(b.rows) for b in batches]
        members = {id(r) for b in batches for r in b.rows}
        decoding = all(r.prefilled for b in batches for r in b.rows)  # no prompt chunk in this forward
        alone = batches[0].rows[0] if sizes == [1] and decoding else None
        made = alone.metrics.generated_tokens if alone is not None else 0
        t0 = self.clock()
        try:
            steps = self.step_batches(batches)
        except Exception as e:  # one bad step must not take the server down: fail its batches, go on
            log.exception("decoding step failed")
            self.scheduler.fail_running(f"decoding failed: {e}", lambda req: any(id(r) in members for r in req.rows))
            for k in keys:
                self.batches[k] = DecodeBatch(self.model)
            return
        took = self.clock() - t0
        if alone is not None:  # what a forward of this width costs one row alone, and its mode's speed alone
            solo = self.solo.get(keys[0])
            self.solo[keys[0]] = took if solo is None else solo + 0.25 * (took - solo)
            self.scheduler.count_solo(alone.params.mode, took, alone.metrics.generated_tokens - made)
        # each row moved one forward on, worth what that forward costs alone (unknown yet: its share of the
        # forward's time, by the tokens its batch put in)
        tokens = [s.tokens for s in steps]
        for k, n, rows in zip(keys, tokens, sizes, strict=True):
            self.pace[k] = self.solo.get(k, took * n / max(1, sum(tokens)) / rows)
            self.busy[k] += self.pace[k]
        self.scheduler.count_forward(sum(sizes))
        outbox = Outbox()
        for req in list(self.scheduler.running):
            self.deliver(req, outbox)
        outbox.flush()

    def participants(self, live: list[int]) -> list[int]:
        """The batches that step together this time: the one whose rows have moved on least, and every other
        that the step would not carry past it (its rows have moved on no further than the lead's will have).
        Batches of like cost then share every forward; one whose forwards cost a hundred times another's
        joins one forward in a hundred of the other's, so the cheap rows are not held to its pace."""
        lead = self.next_batch(live)
        reach = self.busy[lead] + self.pace.get(lead, 0.0)
        return [k for k in live if k == lead or self.busy[k] <= reach]

    def next_batch(self, live: list[int]) -> int:
        """The live batch whose rows have moved on least; one that had no rows is brought level with the
        least busy of those that had, so its idle spell earns it no run of forwards."""
        for k in list(self.busy):
            if k not in live:
                del self.busy[k]
        floor = min(self.busy.values(), default=0.0)
        for k in live:
            self.busy.setdefault(k, floor)
        return min(live, key=lambda k: (self.busy[k], k))

    def deliver(self, req: Request, outbox: Outbox | None = None) -> None:
        """Send what each row made final (through `outbox` when given); finish the request when all its rows
        are done."""
        now = time.perf_counter()
        for i, r in enumerate(req.rows):
            if i in req.finished_rows:
                continue
            if req.stream:
                ids, text = r.take_ids(), r.take_text()
                if ids or text:
                    if req.first_token is None and ids:
                        req.first_token = now
                    req.send(Delta(i, text, ids), outbox)
            elif req.first_token is None and r.output:
                req.first_token = now
            if r.finished:
                req.finished_rows.add(i)
                self.scheduler.count_row(req, r)
                req.send(Finished(i, r.finish_reason, r.metrics, None if req.stream else r.text), outbox)
        if len(req.finished_rows) == len(req.rows):
            self.scheduler.finish(req)
