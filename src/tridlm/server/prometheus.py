"""GET /metrics: the server's HTTP counts and the engine's stats, exposed with prometheus_client.

Each app has its own `CollectorRegistry`, so several apps in one process never share a series. HTTP
requests are counted by prometheus_client's Counter and Histogram as they end. The engine's stats stay
plain data the engine owns (its scheduler reads them to choose modes; inference does not depend on
prometheus_client): `EngineCollector` turns a copy of them into metric families at each scrape.

A server is one process: its engine's worker thread owns the model and batches every request the process
receives, and `tridlm serve` hands uvicorn an app object, which uvicorn never forks into workers. More
capacity means more servers, each its own scrape target. prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR) would merge only the HTTP counters across processes, not their engines' stats,
and would make apps of one process share series, so `ServerMetrics` refuses to run under it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..engine import LATENCY_BUCKETS, SPECULATIVE, EngineStats
from ..engine import Histogram as EngineHistogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # also its deprecated lower-case spelling, as prometheus_client reads


class HTTPStats:
    """Requests by endpoint and status, and their latency (prometheus_client's metrics are thread-safe)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("tridlm_http_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"), registry=registry)
        self.latency = Histogram("tridlm_http_request_duration_seconds",
                                 "HTTP request latency (streams: until the end).", ("endpoint",),
                                 buckets=LATENCY_BUCKETS, registry=registry)

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


class WithoutCreatedSeries(Collector):
    """A registry's families less prometheus_client's `<name>_created` samples, which /metrics never had."""

    def __init__(self, source: CollectorRegistry):
        self.source = source

    def collect(self):
        for family in self.source.collect():  # fresh objects on every collect: safe to filter in place
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family

    def describe(self):
        return self.collect()


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: EngineHistogram) -> None:
    bounds = [floatToGoString(b) for b in h.buckets] + ["+Inf"]
    family.add_metric(labels, list(zip(bounds, accumulate(h.counts), strict=True)), h.total)


def _by_label(kind, name: str, help_: str, label: str, values) -> CounterMetricFamily | GaugeMetricFamily:
    family = kind(name, help_, labels=[label])
    for key, value in values:
        family.add_metric([key], value)
    return family


def _histograms_by_mode(name: str, help_: str, by_mode: dict[str, EngineHistogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_, labels=["mode"])
    for mode, h in sorted(by_mode.items()):
        _add_histogram(family, [mode], h)
    return family


class EngineCollector(Collector):
    """The engine's counters, histograms and gauges, read from one `EngineStats` copy per scrape."""

    def __init__(self, stats: Callable[[], EngineStats], started: float):
        self.stats, self.started = stats, started

    def collect(self) -> Iterator:
        return self.families(self.stats())

    def describe(self) -> Iterator:
        return self.families(EngineStats())  # the same names, so the registry can check them for clashes

    def families(self, s: EngineStats) -> Iterator:
        modes = sorted(set(s.generated_tokens) | set(s.forwards))
        yield _by_label(CounterMetricFamily, "tridlm_requests_total", "Generation requests by outcome.", "outcome",
                        sorted(s.requests.items()))
        yield _by_label(CounterMetricFamily, "tridlm_auto_mode_choices_total",
                        'Modes chosen for mode="auto" requests.', "mode", sorted(s.auto_choices.items()))
        yield _by_label(CounterMetricFamily, "tridlm_speculation_off_total",
                        "Self-speculation requests decoded as AR under load, by the mode they named.", "mode",
                        [(m, s.speculation_off.get(m, 0)) for m in SPECULATIVE])  # both, from zero
        yield _by_label(CounterMetricFamily, "tridlm_generated_tokens_total", "Generated tokens by mode.", "mode",
                        [(m, s.generated_tokens[m]) for m in modes])
        yield _by_label(CounterMetricFamily, "tridlm_forwards_total",
                        "Decode forwards by mode, counted per row (prefill apart).", "mode",
                        [(m, s.forwards[m]) for m in modes])
        yield _by_label(CounterMetricFamily, "tridlm_prefill_forwards_total",
                        "Prefill forwards by mode, counted per row.", "mode",
                        [(m, s.prefill_forwards[m]) for m in modes])
        yield _by_label(GaugeMetricFamily, "tridlm_tokens_per_forward",
                        "Generated tokens / decode forwards since start, by mode.", "mode",
                        [(m, s.generated_tokens[m] / s.forwards[m]) for m in modes if s.forwards[m]])
        yield _histograms_by_mode("tridlm_acceptance_length", "Tokens emitted per self-speculation verification.",
                                  s.acceptance)
        yield CounterMetricFamily("tridlm_batch_forwards_total", "Model calls; each serves every running row.",
                                  value=s.batch_forwards)
        yield CounterMetricFamily("tridlm_batch_rows_total",
                                  "Rows summed over model calls (mean batch = this / forwards).", value=s.batch_rows)
        yield _histograms_by_mode("tridlm_request_latency_seconds", "Submission to last token, by mode.", s.latency)
        yield _histograms_by_mode("tridlm_time_to_first_token_seconds",
                                  "Submission to the first final token, by mode.", s.first_token)
        queue_wait = HistogramMetricFamily("tridlm_queue_wait_seconds", "Submission to admission into the batch.",
                                           labels=[])
        _add_histogram(queue_wait, [], s.queue_wait)
        yield queue_wait
        yield GaugeMetricFamily("tridlm_active_requests", "Requests submitted and not yet finished or cancelled.",
                                value=s.active_requests)
        yield GaugeMetricFamily("tridlm_running_rows", "Rows in the decoding batch.", value=s.running_rows)
        yield GaugeMetricFamily("tridlm_queue_depth", "Rows waiting for a batch slot.", value=s.waiting_rows)
        yield GaugeMetricFamily("tridlm_uptime_seconds", "Seconds since the server started.",
                                value=time.time() - self.started)


class ServerMetrics:
    """One app's metrics: the HTTP counts it records, the engine's stats read at scrape time."""

    def __init__(self, engine_stats: Callable[[], EngineStats], started: float):
        if MULTIPROCESS_ENV in os.environ or MULTIPROCESS_ENV.lower() in os.environ:
            raise ValueError(f"{MULTIPROCESS_ENV} is set, but a tridlm server is one process (its engine batches "
                             "every request in it): prometheus_client's multiprocess mode would merge none of the "
                             f"engine's stats; unset {MULTIPROCESS_ENV} and scrape each server on its own")
        http_registry = CollectorRegistry()
        self.http = HTTPStats(http_registry)
        self.registry = CollectorRegistry()
        self.registry.register(WithoutCreatedSeries(http_registry))
        self.registry.register(EngineCollector(engine_stats, started))

    def render(self) -> bytes:
        return generate_latest(self.registry)
