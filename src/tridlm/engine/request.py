"""One request as the engine holds it: its rows, the events it receives, and how it is cancelled.

The caller reads a request's events (`events()` with an asyncio loop, `iter_events()` without) and may
`cancel()` it; the engine fills it with `send` and `finished_rows` from its worker thread.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..decoding import GenerationError, GenerationParams, Row, RowMetrics
from ..decoding.params import SEED_BITS, forward_width
from ..rows import make_row

AUTO = "auto"  # mode or block_length: the engine decides


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
    text: str | None = None  # the row's whole text, for a request that does not stream (it got no Delta)


@dataclass
class Failed:
    message: str
    reason: str = "error"  # "error" (decoding failed) | "closed" (engine stopping) | "cancelled"


_ids = itertools.count(1)


class Outbox:
    """One engine step's events, handed to each event loop in one call: one wake-up of the server's loop a
    step, not one per request and event (each takes the interpreter from the engine's thread)."""

    def __init__(self):
        self.pending: dict[asyncio.AbstractEventLoop, list] = {}  # loop -> [(put, event)] in order

    def flush(self) -> None:
        for loop, items in self.pending.items():
            _hand_over(loop, items)
        self.pending = {}


def _put_all(items) -> None:
    for put, event in items:
        put(event)


def _hand_over(loop: asyncio.AbstractEventLoop, items) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
        pass


class Request:
    """A submitted request: its rows (one per prompt x n), the mode it runs in, and its event queue."""

    def __init__(self, rows: list[Row], mode: str, block_length: int | str, auto_mode: bool,
                 loop: asyncio.AbstractEventLoop | None, on_cancel: Callable[[Request], None],
                 rebuild_rows: Callable[[int], list[Row]] | None = None, client: str = "",
                 asked_mode: str | None = None, stream: bool = True):
        self.id = next(_ids)
        # whether the reader takes the text as it is made (Delta events); without, each row's text comes once,
        # in its Finished event, and nothing is decoded or sent for the row before it ends
        self.stream = stream
        self.rows = rows
        self.client = client  # who sent it (the server names the connection): the scheduler's unit of fairness
        self.mode = mode  # what runs
        self.asked_mode = asked_mode or mode  # what the request named (differs when speculation was off)
        self.block_length = block_length  # an int once admitted ("auto" until then)
        self.auto_mode = auto_mode
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.rebuild_rows = rebuild_rows  # block length -> rows, for block_length="auto"
        self.done = False  # every row finished, or cancelled, or failed
        self.cancelled = False
        self.finished_rows: set[int] = set()  # rows whose Finished event went out
        self._on_cancel = on_cancel
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop decoding this request and free its cache rows (takes effect before the next step)."""
        self._on_cancel(self)

    def send(self, event, outbox: Outbox | None = None) -> None:
        """Hand an event to whoever reads this request; safe from any thread. With an `outbox` the event waits
        there, to reach its event loop together with the others of the same step."""
        if self._loop is None:
            self._queue.put(event)
        elif outbox is not None:
            outbox.pending.setdefault(self._loop, []).append((self._queue.put_nowait, event))
        else:
            _hand_over(self._loop, [(self._queue.put_nowait, event)])

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


def request_cost(rows: list[Row]) -> int:
    """Token-forwards the rows may need at most: each prompt's prefill plus, per token still to come, one
    decode forward's width (`forward_width`: 1 for AR, the block for diffusion and spec, L*(L+1) for
    spec-quadratic)."""
    total = 0
    for r in rows:
        L = r.params.block_length if isinstance(r.params.block_length, int) else 1
        total += len(r.prompt) + r.limit * forward_width(r.params.mode, L)
    return total


def check_shape(prompts: list[list[int]], n: int, max_rows: int, vocab_size: int,
                mask_id: int | None = None) -> None:
    """Refuse, before any row is built, what the batch could never run: too many rows, a token id outside
    the vocabulary (which would fail the forward of every row beside it), or the mask token (it marks
    positions to fill, never text)."""
    if not isinstance(n, int) or n < 1:
        raise GenerationError(f"n must be an integer >= 1, got {n!r}")
    total = len(prompts) * n
    if total > max_rows:
        raise GenerationError(f"n x prompts = {total} rows, more than the {max_rows} this server decodes at once")
    for i, p in enumerate(prompts):
        bad = next((t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise GenerationError(f"prompt {i} holds token id {bad!r}, outside the vocabulary (0..{vocab_size - 1})")
        if mask_id is not None and mask_id in p:
            raise GenerationError(f"prompt {i} holds the mask token (id {mask_id}), which marks positions to fill "
                                  "and is never text; remove it")


def build_rows(model, tokenizer, prompts: list[list[int]], params: GenerationParams, n: int,
               kind: str = "generate", row_options: dict | None = None,
               max_forward_width: int | None = None) -> list[Row]:
    """len(prompts) x n rows of `kind` (`tridlm.rows.make_row`), row i seeded with params.seed + i (mod
    2**64); building a row validates its parameters."""
    checked = params.resolve(model.config, [len(p) for p in prompts], max_forward_width=max_forward_width)
    if kind == "generate":  # resolved once for the request (infill and revision rows resolve their own layout)
        params = checked
    rows = []
    for i in range(len(prompts) * n):
        seed = None if params.seed is None else (params.seed + i) % (1 << SEED_BITS)
        rows.append(make_row(kind, prompts[i // n], params, model.config, tokenizer, seed=seed, device=model.device,
                             **dict(row_options or {})))
    return rows
