"""Who waits and who runs: admission into the batch's free rows, cancellation, the end of each request,
and the choice mode="auto" makes.

Fairness: each client (the server names its connection; requests without one share no limit) may
hold at most `max_client_share` of the running rows and of the queue, and admission goes round the
clients, least recently served first, taking each one's oldest request that fits: one client's big
request never holds back another's small one, and a request that does not fit yet does not block
those behind it from other clients.

One lock (a condition the worker thread sleeps on) guards the queues and the stats; every method here
takes it, so the submitting threads and the worker can call them freely.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..decoding.params import MODES
from .request import Failed, Request
from .stats import EngineStats

SPECULATIVE = ("spec", "spec-quadratic")  # modes whose greedy text is AR's

if TYPE_CHECKING:
    from ..decoding import Row


@dataclass
class EngineConfig:
    max_running: int = 16  # rows decoded together in one batch
    max_queue: int = 64  # rows that may wait for a batch slot; beyond it submit() raises QueueFull
    auto_spec_below: int = 4  # mode "auto": `auto_light` while fewer rows are active than this
    auto_light: str = "spec"  # few rows: one row's forwards are cheap, speculation buys latency
    auto_heavy: str = "ar"  # many rows: the batch is compute-bound, extra draft tokens cost throughput
    # ... unless the model's drafts are rarely accepted: once `auto_probe` verifications were seen, a mean
    # acceptance below this (2 = a draft+verify cycle makes no more tokens than two AR steps) means AR always
    auto_min_acceptance: float = 2.0
    auto_probe: int = 32
    # explicit greedy spec / spec-quadratic requests submitted while this many rows are running or waiting
    # decode as AR: the same text (both are AR's greedy text), without the draft tokens a compute-bound
    # batch pays for on every row (vLLM's speculative_disable_by_batch_size); None: always speculate
    spec_off_at: int | None = 4
    max_client_share: float = 0.5  # of the running rows and of the queue, per client (1: no limit)
    max_forward_width: int | None = 64  # tokens a row's decode forward may hold (spec-quadratic: L*(L+1))
    prefill_chunk: int | None = 128  # prompt tokens per prefill forward: no join stalls the batch for long
    max_request_cost: int | None = 1 << 19  # token-forwards a request may need (`Request.cost`)

    def __post_init__(self):
        if self.max_running < 1 or self.max_queue < 0 or self.auto_spec_below < 0 or self.auto_probe < 1 \
                or (self.spec_off_at is not None and self.spec_off_at < 0):
            raise ValueError("max_running and auto_probe must be >= 1, max_queue, auto_spec_below and spec_off_at "
                             ">= 0")
        if not 0.0 < self.max_client_share <= 1.0:
            raise ValueError(f"max_client_share must lie in (0, 1], got {self.max_client_share}")
        for m in (self.auto_light, self.auto_heavy):
            if m not in MODES:
                raise ValueError(f"auto mode choice {m!r} is not one of {', '.join(MODES)}")

    def client_rows(self, total: int) -> int:
        """Rows of `total` one client may hold (at least one request's worth of one row)."""
        return max(1, int(total * self.max_client_share))


class QueueFull(RuntimeError):
    """The waiting queue has no room for the request's rows."""


class EngineClosed(RuntimeError):
    """The engine is shut down (or its worker died) and takes no more requests."""


class Scheduler:
    """The waiting requests (in arrival order), the running ones, and the cancellations not yet applied."""

    def __init__(self, config: EngineConfig, stats: EngineStats):
        self.config = config
        self.stats = stats
        self.lock = threading.Condition()  # reentrant: methods here call each other holding it
        self.waiting: list[Request] = []
        self.served: dict[str, int] = {}  # client -> when it was last admitted (a counter), for the round
        self._ticks = 0
        self.running: list[Request] = []
        self.cancels: list[Request] = []
        self.paused = False
        self.closing = False
        self.failure: str | None = None  # why the worker died; then no request is taken

    # -- the policy -----------------------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Rows running or waiting."""
        with self.lock:
            return self.stats.running_rows + self.stats.waiting_rows

    def choose_mode(self, load: int) -> str:
        """mode="auto": speculate while the load is light and speculation has been paying off: its drafts
        are accepted, and it has decoded faster alone than the heavy mode (both timed on this machine)."""
        c = self.config
        if load >= c.auto_spec_below:
            return c.auto_heavy
        with self.lock:
            seen = self.stats.acceptance.get(c.auto_light)
            if seen is not None and seen.count >= c.auto_probe and seen.total / seen.count < c.auto_min_acceptance:
                return c.auto_heavy
            # ... or unless the other mode decodes faster alone on this machine: once `auto_probe` tokens of
            # the light mode were timed alone, light-load requests run the heavy one until it was timed too
            light = self.stats.solo_seconds_per_token(c.auto_light, c.auto_probe)
            heavy = self.stats.solo_seconds_per_token(c.auto_heavy, c.auto_probe)
            if light is not None and (heavy is None or heavy < light):
                return c.auto_heavy
        return c.auto_light

    def speculation_off(self, mode: str, greedy: bool, load: int) -> bool:
        """An explicit self-speculation request decodes as AR under load (`EngineConfig.spec_off_at`)."""
        at = self.config.spec_off_at
        return greedy and mode in SPECULATIVE and at is not None and load >= at

    # -- from the submitting threads ------------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        """Queue a validated request, or raise EngineClosed / QueueFull."""
        with self.lock:
            if self.closing or self.failure:
                raise EngineClosed(self.failure or "the engine is shut down")
            s, c = self.stats, self.config
            # rows beyond the batch's free slots (after those already waiting) must fit in the queue
            if s.waiting_rows + len(req.rows) - max(0, c.max_running - s.running_rows) > c.max_queue:
                s.requests["rejected"] += 1
                raise QueueFull(f"the request queue is full ({c.max_queue} rows waiting); retry later")
            mine = self._rows_of(req.client)
            cap = c.client_rows(c.max_running) + c.client_rows(c.max_queue)
            if req.client and mine + len(req.rows) > cap:
                s.requests["rejected"] += 1
                raise QueueFull(f"this client already has {mine} rows running or waiting, and at most {cap} are "
                                "allowed per client; wait for them to finish")
            if req.auto_mode:
                s.auto_choices[req.mode] += 1
            if req.asked_mode != req.mode:  # only an explicit request's mode is ever changed
                s.speculation_off[req.asked_mode] += 1
            self.waiting.append(req)
            s.active_requests += 1
            self._update_gauges()
            self.lock.notify_all()

    def cancel(self, req: Request) -> None:
        """Mark `req` cancelled; the worker drops it before its next step."""
        with self.lock:
            if not req.done and not req.cancelled:
                req.cancelled = True
                self.cancels.append(req)
                self.lock.notify_all()

    def set_paused(self, paused: bool) -> None:
        with self.lock:
            self.paused = paused
            self.lock.notify_all()

    def stop(self) -> None:
        """Ask the worker to return (at its next look at the queues)."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()

    # -- from the worker thread -----------------------------------------------------------------------
    def next_work(self, runner) -> list[Request] | None:
        """Wait for work, apply cancellations, move the waiting requests that fit into running; None = stop.

        `runner` holds the rows (`row_count`, `idle`, `remove(rows)`)."""
        with self.lock:
            while True:
                if self.closing:
                    return None
                if self.cancels:
                    self._apply_cancels(runner)
                if not self.paused and (self.waiting or not runner.idle):
                    break
                self.lock.wait()
            admitted = self._admit(self.config.max_running - runner.row_count)
            self._update_gauges()
            return admitted

    def _admit(self, free: int) -> list[Request]:
        """Round the clients, least recently served first, admitting each one's oldest request that fits."""
        c, admitted = self.config, []
        cap = c.client_rows(c.max_running)
        while free > 0:
            heads: dict[str, Request] = {}
            for req in self.waiting:
                heads.setdefault(req.client, req)
            fits = [r for r in heads.values() if len(r.rows) <= free and (
                not r.client or not self._running_rows_of(r.client)
                or self._running_rows_of(r.client) + len(r.rows) <= cap)]
            if not fits:
                return admitted
            req = min(fits, key=lambda r: (self.served.get(r.client, -1), r.submitted))
            self.waiting.remove(req)
            self.running.append(req)
            self._ticks += 1
            self.served[req.client] = self._ticks
            free -= len(req.rows)
            admitted.append(req)
            self.stats.queue_wait.observe(time.perf_counter() - req.submitted)
        return admitted

    def _running_rows_of(self, client: str) -> int:
        return sum(len(r.rows) for r in self.running if r.client == client)

    def _rows_of(self, client: str) -> int:
        return self._running_rows_of(client) + sum(len(r.rows) for r in self.waiting if r.client == client)

    def count_row(self, req: Request, row: Row) -> None:
        with self.lock:
            self.stats.count_row(req.mode, row.metrics)

    def count_solo(self, mode: str, seconds: float, tokens: int) -> None:
        with self.lock:
            self.stats.count_solo(mode, seconds, tokens)

    def count_forward(self, rows: int) -> None:
        with self.lock:
            self.stats.count_forward(rows)

    def finish(self, req: Request) -> None:
        """Every row of `req` finished (their events went out)."""
        with self.lock:
            if req in self.running:
                self.running.remove(req)
            self._end(req, None, "finished")
            self._update_gauges()

    def fail(self, req: Request, message: str) -> None:
        """`req` could not run; the others go on."""
        with self.lock:
            if req in self.running:
                self.running.remove(req)
            self._end(req, Failed(message), "failed")
            self._update_gauges()

    def fail_running(self, message: str, which=lambda req: True) -> None:
        """A step failed: the running requests `which` picks fail with it (waiting ones stay queued)."""
        with self.lock:
            for req in [r for r in self.running if which(r)]:
                self._end(req, Failed(message), "failed")
                self.running.remove(req)
            self._update_gauges()

    def fail_everyone(self, message: str) -> None:
        """The engine stops: every request still running or waiting gets a "closed" Failed."""
        with self.lock:
            for req in list(self.running) + list(self.waiting):
                self._end(req, Failed(message, "closed"), "failed")
            self.running.clear()
            self.waiting.clear()
            self._update_gauges()

    def worker_died(self, message: str) -> None:
        """Refuse new requests from now on and fail the ones there are, all with `message`."""
        with self.lock:
            self.failure = message
            self.fail_everyone(message)

    # -- bookkeeping (the lock is held) ---------------------------------------------------------------
    def _apply_cancels(self, runner) -> None:
        for req in self.cancels:
            if req.done:
                continue
            runner.remove(req.rows)  # frees the rows' cache entries
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            for i, r in enumerate(req.rows):
                if i not in req.finished_rows:
                    self.stats.count_row(req.mode, r.metrics)
            self._end(req, Failed("the request was cancelled", "cancelled"), "cancelled")
        self.cancels.clear()
        self._update_gauges()

    def _end(self, req: Request, event, outcome: str) -> None:
        if req.done:
            return
        req.done = True
        self.stats.count_end(req.mode, outcome, req.submitted, req.first_token)
        if event is not None:
            req.send(event)

    def _update_gauges(self) -> None:
        self.stats.running_rows = sum(len(r.rows) for r in self.running)
        self.stats.waiting_rows = sum(len(r.rows) for r in self.waiting)
