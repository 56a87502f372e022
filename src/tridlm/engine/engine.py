"""`Engine`: takes requests from any thread and decodes them in one worker thread that owns the model."""

from __future__ import annotations

import asyncio
import logging
import threading

import torch

from ..decoding import GenerationError, GenerationParams
from ..decoding.params import TEMPERATURE_FLOOR
from .request import AUTO, Request, build_rows, check_shape, request_cost
from .runner import Runner
from .scheduler import EngineConfig, Scheduler
from .stats import EngineStats

log = logging.getLogger("tridlm.engine")


def off_this_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, run in a short-lived thread: what loads and warms a model for an `Engine`.

    torch's CPU ops run on OpenMP, and every thread that opens a parallel region keeps a pool of worker
    threads of its own. Once the pools hold more threads than there are cores, libgomp stops spinning
    between regions and every op waits for its workers to wake: a forward in the engine's worker thread
    then takes about 1.5x as long as the same forward in a process with one pool (24 AR tokens of the
    default model on 2 cores: 1.19 s against 0.76 s). A thread's pool ends with it, so a model loaded
    here leaves the worker's pool the only one; the caller's thread must then run no large torch op."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="tridlm-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Engine:
    """Wires the scheduler (who waits, who runs), the runner (the batch) and the stats, and runs the worker."""

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, start: bool = True):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config, EngineStats())
        self.runner = Runner(model, self.scheduler, self.config.prefill_chunk)
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
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.scheduler.fail_everyone("the server is shutting down")

    def drain(self, message: str = "the server is shutting down; retry on another replica or later") -> None:
        """Refuse new requests and end every running or waiting one now with a "closed" Failed (a server
        answers them 503); the worker stops at its next look at the queues."""
        self.scheduler.stop()
        self.scheduler.fail_everyone(message)

    def pause(self) -> None:
        """Hold admission and stepping (cancellations still apply) until resume()."""
        self.scheduler.set_paused(True)

    def resume(self) -> None:
        self.scheduler.set_paused(False)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Rows running or waiting (what mode="auto" looks at)."""
        return self.scheduler.load

    @property
    def failure(self) -> str | None:
        """Why the worker thread died, or None while it serves; once set, submit() raises EngineClosed."""
        with self.scheduler.lock:
            return self.scheduler.failure

    def stats(self) -> EngineStats:
        """A consistent copy of the counters and gauges."""
        with self.scheduler.lock:
            return self.scheduler.stats.copy()

    # -- submission --------------------------------------------------------------------------------------
    def choose_mode(self, load: int) -> str:
        """mode="auto": speculate while the load is light and speculation has been paying off."""
        return self.scheduler.choose_mode(load)

    def submit(self, prompts: list[list[int]], params: GenerationParams, n: int = 1,
               loop: asyncio.AbstractEventLoop | None = None, kind: str = "generate", client: str = "",
               stream: bool = True, **row_options) -> Request:
        """Validate and queue one request: len(prompts) x n rows, row i seeded with params.seed + i.

        kind and row_options: what each row is (`tridlm.rows.make_row`): a continuation of its prompt by
        default, or an infill (suffix_ids=...), a revision. client: who sent it (fair shares are per client).
        stream: Delta events as the text is made (else each row's text comes in its Finished event).

        Raises GenerationError (bad parameters or prompt, or a request costlier than the engine takes),
        QueueFull, or EngineClosed; never blocks.
        """
        c = self.config
        check_shape(prompts, n, c.max_running, self.model.config.vocab_size, self.model.config.mask_token_id)
        auto_block = params.block_length == AUTO
        auto_mode = params.mode == AUTO
        load = self.load
        mode = self.choose_mode(load) if auto_mode else params.mode
        asked = mode
        if not auto_mode and kind == "generate" and self.scheduler.speculation_off(
                mode, params.temperature < TEMPERATURE_FLOOR, load):
            mode = "ar"
        # "auto" is measured on admission, in the worker: until then the rows are checked at the checkpoint's
        # own block size (GenerationParams' default), then rebuilt at the measured one
        block = self.model.config.block_size if auto_block else params.block_length
        if auto_block and self.runner.auto_block is not None:
            block, auto_block = self.runner.auto_block, False
        params = params.replace(mode=mode)

        def rows_for(block_length: int):
            return build_rows(self.model, self.tokenizer, prompts, params.replace(block_length=block_length), n,
                              kind, row_options, c.max_forward_width)

        rows = rows_for(block)  # validates before queueing
        if not auto_block:  # what the rows resolved it to (the checkpoint's block size unless given)
            block = rows[0].params.block_length if rows else block
        cost = request_cost(rows)
        if c.max_request_cost is not None and cost > c.max_request_cost:
            raise GenerationError(f"this request may need {cost} token-forwards (prompt tokens + max_tokens x the "
                                  f"forward width of its mode, per row); the limit is {c.max_request_cost}: lower "
                                  "max_tokens, n or block_length")
        req = Request(rows, mode, AUTO if auto_block else block, auto_mode, loop, on_cancel=self.scheduler.cancel,
                      rebuild_rows=rows_for if auto_block else None, client=client, asked_mode=asked, stream=stream)
        self.scheduler.enqueue(req)
        return req

    # -- the worker ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    admitted = self.scheduler.next_work(self.runner)
                    if admitted is None:
                        return
                    for req in admitted:
                        self.runner.admit(req)
                    if not self.runner.idle:
                        self.runner.step()
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("engine worker died")
            self.scheduler.worker_died(f"the decoding engine stopped: {e}")
