"""The worker thread's hands: one `DecodeBatch` over the model, stepped while it holds rows.

Admitted requests' rows join the batch between steps; after each step what every row made final
goes out as its request's events, and a request whose rows have all finished is handed back to the
scheduler. A failing step fails only the requests in that batch; the next ones get a fresh batch.
"""

from __future__ import annotations

import logging
import time

from ..decoding import DecodeBatch
from .request import AUTO, Delta, Finished, Request
from .scheduler import Scheduler

log = logging.getLogger("tridlm.engine")


class Runner:
    """Owns the batch; only the engine's worker thread calls it."""

    def __init__(self, model, scheduler: Scheduler):
        self.model = model
        self.scheduler = scheduler
        self.batch = DecodeBatch(model)
        self.auto_block: int | None = None  # what block_length="auto" resolved to, once it was needed

    def admit(self, req: Request) -> None:
        """Put the request's rows into the batch (resolving block_length="auto" first)."""
        try:
            if req.block_length == AUTO:
                block = self.resolve_auto_block()
                req.rows = req.rebuild_rows(block)
                req.block_length = block
            self.batch.add(*req.rows)
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
        """One forward for every row in the batch, then deliver what it made final."""
        rows = len(self.batch.rows)
        try:
            self.batch.step()
        except Exception as e:  # one bad step must not take the server down: fail this batch, go on
            log.exception("decoding step failed")
            self.scheduler.fail_running(f"decoding failed: {e}")
            self.batch = DecodeBatch(self.model)
            return
        self.scheduler.count_forward(rows)
        for req in list(self.scheduler.running):
            self.deliver(req)

    def deliver(self, req: Request) -> None:
        """Send what each row made final; finish the request when all its rows are done."""
        now = time.perf_counter()
        for i, r in enumerate(req.rows):
            if i in req.finished_rows:
                continue
            ids, text = r.take_ids(), r.take_text()
            if ids or text:
                if req.first_token is None and ids:
                    req.first_token = now
                req.send(Delta(i, text, ids))
            if r.finished:
                req.finished_rows.add(i)
                self.scheduler.count_row(req, r)
                req.send(Finished(i, r.finish_reason, r.metrics))
        if len(req.finished_rows) == len(req.rows):
            self.scheduler.finish(req)
