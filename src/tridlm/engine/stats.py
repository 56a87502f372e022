"""What the engine counts: requests by outcome, tokens and forwards by mode, latencies, batch sizes, queue gauges.

The scheduler's lock guards an `EngineStats`; readers get a `copy()`. It is plain data because the engine
itself reads it (the auto-mode policy reads the acceptance histogram) and inference does not depend on a
metrics library: the server's collector (`tridlm.server.prometheus`) exposes a copy at each scrape.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..decoding import RowMetrics

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ACCEPTANCE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass
class Histogram:
    """Counts per bucket (value <= bound), their sum and number: what a Prometheus histogram exposes."""

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


def _histogram_maker(buckets):
    return lambda: Histogram(buckets)


@dataclass
class EngineStats:
    """Counters since start, by mode where it matters; gauges are current."""

    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # finished|cancelled|failed|...
    auto_choices: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    speculation_off: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # requested mode -> AR runs
    generated_tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per-row decode forwards
    prefill_forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    acceptance: dict[str, Histogram] = field(default_factory=lambda: defaultdict(_histogram_maker(ACCEPTANCE_BUCKETS)))
    latency: dict[str, Histogram] = field(default_factory=lambda: defaultdict(_histogram_maker(LATENCY_BUCKETS)))
    first_token: dict[str, Histogram] = field(default_factory=lambda: defaultdict(_histogram_maker(LATENCY_BUCKETS)))
    queue_wait: Histogram = field(default_factory=_histogram_maker(LATENCY_BUCKETS))
    # mode -> [seconds, tokens] of decode forwards that held one row alone: each mode's speed here, unloaded
    solo_decode: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0]))
    batch_forwards: int = 0  # model calls (each serves every running row)
    batch_rows: int = 0  # rows summed over model calls (mean batch size = batch_rows / batch_forwards)
    active_requests: int = 0
    running_rows: int = 0
    waiting_rows: int = 0

    def copy(self) -> EngineStats:
        c = EngineStats()
        for name in ("requests", "auto_choices", "speculation_off", "generated_tokens", "forwards", "prefill_forwards"):
            getattr(c, name).update(getattr(self, name))
        for name in ("acceptance", "latency", "first_token"):
            getattr(c, name).update({k: h.copy() for k, h in getattr(self, name).items()})
        c.queue_wait = self.queue_wait.copy()
        c.solo_decode.update({m: list(v) for m, v in self.solo_decode.items()})
        c.batch_forwards, c.batch_rows = self.batch_forwards, self.batch_rows
        c.active_requests, c.running_rows, c.waiting_rows = self.active_requests, self.running_rows, self.waiting_rows
        return c

    # -- recording (the caller holds the scheduler's lock) ----------------------------------------------
    def count_row(self, mode: str, metrics: RowMetrics) -> None:
        """A row's work, counted once: when it finishes, or when its request is cancelled before it does."""
        self.generated_tokens[mode] += metrics.generated_tokens
        self.forwards[mode] += metrics.forwards
        self.prefill_forwards[mode] += metrics.prefill_forwards
        for a in metrics.acceptance_lengths:
            self.acceptance[mode].observe(a)

    def count_solo(self, mode: str, seconds: float, tokens: int) -> None:
        """A decode forward that held one row of `mode` alone, and the tokens it made."""
        t = self.solo_decode[mode]
        t[0] += seconds
        t[1] += tokens

    def solo_seconds_per_token(self, mode: str, min_tokens: int) -> float | None:
        """Seconds per token of `mode` alone, once at least `min_tokens` were timed."""
        seconds, tokens = self.solo_decode.get(mode, (0.0, 0))
        return seconds / tokens if tokens >= min_tokens else None

    def count_forward(self, rows: int) -> None:
        """One model call that served `rows` rows (the mean batch size comes from these)."""
        self.batch_forwards += 1
        self.batch_rows += rows

    def count_end(self, mode: str, outcome: str, submitted: float, first_token: float | None) -> None:
        """A request left the engine; only finished ones feed the latency histograms."""
        self.requests[outcome] += 1
        self.active_requests -= 1
        if outcome == "finished":
            now = time.perf_counter()
            self.latency[mode].observe(now - submitted)
            if first_token is not None:
                self.first_token[mode].observe(first_token - submitted)
