"""The serving engine: many requests, any modes, decoded together by one worker thread.

One thread owns the model and one `DecodeBatch`. Between two steps it drops cancelled requests
(freeing their cache rows) and admits waiting ones, so requests join and leave continuously; each
row computes what it would alone (the batch contract), so a request's greedy output does not depend
on what else runs -- up to near ties: a batch is a wider forward whose kernels round differently, so
at a position whose top-2 logit gap is below the error bound of `tridlm.numerics` (README, "What is
exact") a request may get the other of two near-equal tokens. Output goes to each request's own
event queue as soon as the row makes it final (an asyncio queue fed with `call_soon_threadsafe`, or a
plain thread-safe queue).

    engine = Engine(model, tokenizer, EngineConfig(max_running=16))
    req = engine.submit([prompt_ids], GenerationParams(mode="auto", max_new_tokens=64))
    for event in req.iter_events():   # or `async for event in req.events()` with submit(loop=...)
        ...                            # Delta(index, text, ids) | Finished(index, reason, metrics) | Failed
    engine.close()

`mode="auto"` is decided at submission from the load (rows running or waiting) and from the acceptance
self-speculation has had on this server; `block_length="auto"` is resolved once, in the worker thread
(it times forwards), by `tridlm.bench.cost_profile`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from .decoding import DecodeBatch, GenerationError, GenerationParams, Row, RowMetrics
from .decoding.params import MODES

log = logging.getLogger("tridlm.engine")

AUTO = "auto"
# block_length used to validate a request whose block length is resolved later ("auto")
_PLACEHOLDER_BLOCK = 32


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

    def __post_init__(self):
        if self.max_running < 1 or self.max_queue < 0 or self.auto_spec_below < 0 or self.auto_probe < 1:
            raise ValueError("max_running and auto_probe must be >= 1, max_queue and auto_spec_below >= 0")
        for m in (self.auto_light, self.auto_heavy):
            if m not in MODES:
                raise ValueError(f"auto mode choice {m!r} is not one of {', '.join(MODES)}")


class QueueFull(RuntimeError):
    """The waiting queue has no room for the request's rows."""


class EngineClosed(RuntimeError):
    """The engine is shut down (or its worker died) and takes no more requests."""


# -- events a request receives --------------------------------------------------------------------
@dataclass
class Delta:
    index: int  # which row (choice) of the request
    text: str
    ids: list[int]


@dataclass
class Finished:
    index: int
    reason: str  # "eos" | "length" | "stop"
    metrics: RowMetrics


@dataclass
class Failed:
    message: str
    reason: str = "error"  # "error" (decoding failed) | "closed" (engine stopping) | "cancelled"


# -- metrics ---------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ACCEPTANCE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.total, self.count)


def _hist(buckets):
    return lambda: Histogram(buckets)


@dataclass
class EngineStats:
    """Counters since start, by mode where it matters; gauges are current."""

    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # finished|cancelled|failed|...
    auto_choices: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    generated_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per-row decode forwards
    prefill_forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    acceptance: dict[str, Histogram] = field(default_factory=lambda: defaultdict(_hist(ACCEPTANCE_BUCKETS)))
    latency: dict[str, Histogram] = field(default_factory=lambda: defaultdict(_hist(LATENCY_BUCKETS)))
    first_token: dict[str, Histogram] = field(default_factory=lambda: defaultdict(_hist(LATENCY_BUCKETS)))
    queue_wait: Histogram = field(default_factory=_hist(LATENCY_BUCKETS))
    batch_forwards: int = 0  # model calls (each serves every running row)
    batch_rows: int = 0  # rows summed over model calls (mean batch size = batch_rows / batch_forwards)
    active_requests: int = 0
    running_rows: int = 0
    waiting_rows: int = 0

    def copy(self) -> EngineStats:
        c = EngineStats()
        for name in ("requests", "auto_choices", "generated_tokens", "forwards", "prefill_forwards"):
            getattr(c, name).update(getattr(self, name))
        for name in ("acceptance", "latency", "first_token"):
            getattr(c, name).update({k: h.copy() for k, h in getattr(self, name).items()})
        c.queue_wait = self.queue_wait.copy()
        c.batch_forwards, c.batch_rows = self.batch_forwards, self.batch_rows
        c.active_requests, c.running_rows, c.waiting_rows = self.active_requests, self.running_rows, self.waiting_rows
        return c


# -- one request -------------------------------------------------------------------------------------
_ids = itertools.count(1)


class Request:
    """A submitted request: its rows (one per prompt x n), the mode it runs in, and its event queue."""

    def __init__(self, engine: Engine, rows: list[Row], mode: str, block_length: int | str, auto_mode: bool,
                 loop: asyncio.AbstractEventLoop | None):
        self.id = next(_ids)
        self.engine = engine
        self.rows = rows
        self.mode = mode
        self.block_length = block_length  # an int once admitted ("auto" until then)
        self.auto_mode = auto_mode
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self._remake = None  # block length -> rows, for block_length="auto"
        self.done = False  # every row finished, or cancelled, or failed
        self.cancelled = False
        self._finished: set[int] = set()  # rows whose Finished event went out
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop decoding this request and free its cache rows (takes effect before the next step)."""
        self.engine._cancel(self)

    def _put(self, event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
            pass

    async def events(self):
        """Events until every row has finished (or a Failed); needs `submit(..., loop=...)`."""
        left = len(self.rows)
        while left:
            event = await self._queue.get()
            yield event
            if isinstance(event, Failed):
                return
            left -= isinstance(event, Finished)

    def iter_events(self, timeout: float | None = None):
        """The same, blocking (for a request submitted without a loop)."""
        left = len(self.rows)
        while left:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, Failed):
                return
            left -= isinstance(event, Finished)


# -- the engine ----------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, start: bool = True):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.config = config or EngineConfig()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cancels: list[Request] = []
        self._paused = False
        self._closing = False
        self._dead: str | None = None
        self._auto_block: int | None = None
        self._stats = EngineStats()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- control ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tridlm-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still running or waiting get a Failed event."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for req in list(self._running) + list(self._waiting):
                self._end(req, Failed("the server is shutting down", "closed"), "failed")
            self._running.clear()
            self._waiting.clear()
            self._update_gauges()

    def pause(self) -> None:
        """Hold admission and stepping (cancellations still apply) until resume()."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def load(self) -> int:
        """Rows running or waiting (what mode="auto" looks at)."""
        with self._cond:
            return self._stats.running_rows + self._stats.waiting_rows

    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats.copy()

    # -- submission --------------------------------------------------------------------------------------
    def choose_mode(self, load: int) -> str:
        """mode="auto": speculate while the load is light and speculation has been paying off."""
        c = self.config
        if load >= c.auto_spec_below:
            return c.auto_heavy
        with self._cond:
            seen = self._stats.acceptance.get(c.auto_light)
            if seen is not None and seen.count >= c.auto_probe and seen.total / seen.count < c.auto_min_acceptance:
                return c.auto_heavy
        return c.auto_light

    def submit(self, prompts: list[list[int]], params: GenerationParams, n: int = 1,
               loop: asyncio.AbstractEventLoop | None = None, build_row=None) -> Request:
        """Validate and queue one request: len(prompts) x n rows, row i seeded with params.seed + i.

        build_row(prompt, params, seed) -> Row makes the rows of requests that are not plain
        continuations (an infill with a suffix, a revision); by default each row continues its prompt.

        Raises GenerationError (bad parameters or prompt), QueueFull, or EngineClosed; never blocks.
        """
        if not isinstance(n, int) or n < 1:
            raise GenerationError(f"n must be an integer >= 1, got {n!r}")
        total = len(prompts) * n
        if total > self.config.max_running:
            raise GenerationError(f"n x prompts = {total} rows, more than the {self.config.max_running} "
                                  f"this server decodes at once")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):  # an out-of-range id would fail the whole batch's forward
            bad = next((t for t in p if not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise GenerationError(f"prompt {i} holds token id {bad!r}, outside the vocabulary (0..{vocab - 1})")
        auto_block = params.block_length == AUTO
        auto_mode = params.mode == AUTO
        mode = self.choose_mode(self.load) if auto_mode else params.mode
        block = _PLACEHOLDER_BLOCK if auto_block else params.block_length
        if auto_block and self._auto_block is not None:
            block, auto_block = self._auto_block, False
        params = params.replace(mode=mode)
        rows = self._rows(prompts, params.replace(block_length=block), n, build_row)  # validates before queueing
        req = Request(self, rows, mode, AUTO if auto_block else block, auto_mode, loop)
        if auto_block:  # rebuilt with the resolved block length on admission (steps default to it)
            req._remake = lambda b: self._rows(prompts, params.replace(block_length=b), n, build_row)
        with self._cond:
            if self._closing or self._dead:
                raise EngineClosed(self._dead or "the engine is shut down")
            s, c = self._stats, self.config
            # rows beyond the batch's free slots (after those already waiting) must fit in the queue
            if s.waiting_rows + total - max(0, c.max_running - s.running_rows) > c.max_queue:
                self._stats.requests["rejected"] += 1
                raise QueueFull(f"the request queue is full ({self.config.max_queue} rows waiting); retry later")
            if auto_mode:
                self._stats.auto_choices[mode] += 1
            self._waiting.append(req)
            self._stats.active_requests += 1
            self._update_gauges()
            self._cond.notify_all()
        return req

    def _rows(self, prompts, params: GenerationParams, n: int, build_row=None) -> list[Row]:
        rows = []
        for i in range(len(prompts) * n):
            seed = None if params.seed is None else params.seed + i
            if build_row is not None:
                rows.append(build_row(prompts[i // n], params, seed))
            else:
                rows.append(Row(prompts[i // n], params, self.model.config, self.tokenizer, seed=seed,
                                device=self.model.device))
        return rows

    def _cancel(self, req: Request) -> None:
        with self._cond:
            if not req.done and not req.cancelled:
                req.cancelled = True
                self._cancels.append(req)
                self._cond.notify_all()

    # -- the worker ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        batch = DecodeBatch(self.model)
        try:
            with torch.inference_mode():
                while True:
                    admitted = self._next_work(batch)
                    if admitted is None:
                        return
                    for req in admitted:
                        self._admit(batch, req)
                    if batch.done:
                        continue
                    batch = self._step(batch)
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("engine worker died")
            with self._cond:
                self._dead = f"the decoding engine stopped: {e}"
                for req in list(self._running) + list(self._waiting):
                    self._end(req, Failed(self._dead, "closed"), "failed")
                self._running.clear()
                self._waiting.clear()
                self._update_gauges()

    def _next_work(self, batch: DecodeBatch) -> list[Request] | None:
        """Under the lock: wait for work, apply cancellations, pop the requests that fit; None = stop."""
        with self._cond:
            while True:
                if self._closing:
                    return None
                if self._cancels:
                    self._apply_cancels(batch)
                if not self._paused and (self._waiting or not batch.done):
                    break
                self._cond.wait()
            admitted = []
            free = self.config.max_running - len(batch.rows)
            while self._waiting and len(self._waiting[0].rows) <= free:  # FIFO: no overtaking
                req = self._waiting.popleft()
                free -= len(req.rows)
                self._running.append(req)
                admitted.append(req)
                self._stats.queue_wait.observe(time.perf_counter() - req.submitted)
            self._update_gauges()
            return admitted

    def _apply_cancels(self, batch: DecodeBatch) -> None:
        for req in self._cancels:
            if req.done:
                continue
            batch.remove(*req.rows)  # frees the rows' cache entries
            if req in self._running:
                self._running.remove(req)
            elif req in self._waiting:
                self._waiting.remove(req)
            for i, r in enumerate(req.rows):
                if i not in req._finished:
                    self._count_row(req, r)
            self._end(req, Failed("the request was cancelled", "cancelled"), "cancelled")
        self._cancels.clear()
        self._update_gauges()

    def _admit(self, batch: DecodeBatch, req: Request) -> None:
        try:
            if req.block_length == AUTO:
                block = self._resolve_auto_block()
                req.rows = req._remake(block)
                req.block_length = block
            batch.add(*req.rows)
        except Exception as e:
            log.exception("admitting request %d failed", req.id)
            with self._cond:
                self._running.remove(req)
                self._end(req, Failed(f"could not start decoding: {e}"), "failed")
                self._update_gauges()
            return
        self._deliver(req)  # rows that finished before any forward (no room left in the context)

    def _resolve_auto_block(self) -> int:
        if self._auto_block is None:  # what generate() uses for block_length="auto"
            from .generate import auto_block_length

            self._auto_block = int(auto_block_length(self.model))
            log.info("block_length auto -> %d", self._auto_block)
        return self._auto_block

    def _step(self, batch: DecodeBatch) -> DecodeBatch:
        rows = len(batch.rows)
        try:
            batch.step()
        except Exception as e:  # one bad step must not take the server down: fail this batch, go on
            log.exception("decoding step failed")
            with self._cond:
                for req in list(self._running):
                    self._end(req, Failed(f"decoding failed: {e}"), "failed")
                self._running.clear()
                self._update_gauges()
            return DecodeBatch(self.model)
        with self._cond:
            self._stats.batch_forwards += 1
            self._stats.batch_rows += rows
        for req in list(self._running):
            self._deliver(req)
        return batch

    def _deliver(self, req: Request) -> None:
        """Send what each row made final; finish the request when all its rows are done."""
        now = time.perf_counter()
        for i, r in enumerate(req.rows):
            if i in req._finished:
                continue
            ids, text = r.take_ids(), r.take_text()
            if ids or text:
                if req.first_token is None and ids:
                    req.first_token = now
                req._put(Delta(i, text, ids))
            if r.finished:
                req._finished.add(i)
                with self._cond:
                    self._count_row(req, r)
                req._put(Finished(i, r.finish_reason, r.metrics))
        if len(req._finished) == len(req.rows):
            with self._cond:
                if req in self._running:
                    self._running.remove(req)
                self._end(req, None, "finished")
                self._update_gauges()

    # -- bookkeeping (callers hold the lock) --------------------------------------------------------------
    def _count_row(self, req: Request, r: Row) -> None:
        s, m = self._stats, r.metrics
        s.generated_tokens[req.mode] += m.generated_tokens
        s.forwards[req.mode] += m.forwards
        s.prefill_forwards[req.mode] += m.prefill_forwards
        for a in m.acceptance_lengths:
            s.acceptance[req.mode].observe(a)

    def _end(self, req: Request, event, outcome: str) -> None:
        if req.done:
            return
        req.done = True
        self._stats.requests[outcome] += 1
        self._stats.active_requests -= 1
        if outcome == "finished":
            now = time.perf_counter()
            self._stats.latency[req.mode].observe(now - req.submitted)
            if req.first_token is not None:
                self._stats.first_token[req.mode].observe(req.first_token - req.submitted)
        if event is not None:
            req._put(event)

    def _update_gauges(self) -> None:
        self._stats.running_rows = sum(len(r.rows) for r in self._running)
        self._stats.waiting_rows = sum(len(r.rows) for r in self._waiting)
