"""The serving engine: many requests, any modes, decoded together by one worker thread.

One thread owns the model and its `DecodeBatch`es (one per forward width, sharing forwards). Between
two steps it drops cancelled requests
(freeing their cache rows) and admits waiting ones, so requests join and leave continuously; each
row computes what it would alone (the batch contract), so a request's greedy output does not depend
on what else runs -- up to near ties: a batch is a wider forward whose kernels round differently, so
at a position whose top-2 logit gap is below the error bound of `tridlm.numerics` (README, "What is
exact") a request may get the other of two near-equal tokens. Output goes to each request's own
event queue as soon as the row makes it final (an asyncio queue, fed once a step for all requests on one
event loop, or a plain thread-safe queue); a request submitted with stream=False gets no Deltas, only
each row's whole text in its Finished event.

    engine = Engine(model, tokenizer, EngineConfig(max_running=16))
    req = engine.submit([prompt_ids], GenerationParams(mode="auto", max_new_tokens=64))
    for event in req.iter_events():   # or `async for event in req.events()` with submit(loop=...)
        ...                            # Delta(index, text, ids) | Finished(index, reason, metrics, text) | Failed
    engine.close()

`mode="auto"` is decided at submission from the load (rows running or waiting), from the acceptance
self-speculation has had on this server and from how fast each mode decoded a row alone here; so is
a greedy spec request's fall back to AR under load (`EngineConfig.spec_off_at`). `block_length="auto"`
is resolved once, in the worker thread (it times forwards), by `tridlm.generate.auto_block_length`.

Every request is bounded before it is queued: its parameters (`GenerationParams.resolve`, with the
engine's `max_forward_width`), its cost (`request_cost`: token-forwards it may need), and its
client's share of the rows (`EngineConfig.max_client_share`).

The parts: `request` (a request, its events, its cancellation, its cost), `scheduler` (the waiting and
running requests, fair admission, the mode "auto" policy), `runner` (steps the batches, delivers the
rows' output),
`stats` (counters and gauges), and `engine` (the `Engine` that wires them, and its worker thread).
Load and warm the model with `off_this_thread(...)` (the worker's OpenMP pool is then the only one).
"""

from .engine import Engine, off_this_thread
from .request import AUTO, Delta, Failed, Finished, Request
from .scheduler import SPECULATIVE, EngineClosed, EngineConfig, QueueFull
from .stats import ACCEPTANCE_BUCKETS, LATENCY_BUCKETS, EngineStats, Histogram

__all__ = ["ACCEPTANCE_BUCKETS", "AUTO", "LATENCY_BUCKETS", "Delta", "Engine", "EngineClosed", "EngineConfig",
           "EngineStats", "Failed", "Finished", "Histogram", "QueueFull", "Request",
           "SPECULATIVE", "off_this_thread"]
