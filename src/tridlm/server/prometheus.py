"""GET /metrics: the engine's counters and the server's request counts in Prometheus text format (0.0.4)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from ..engine import LATENCY_BUCKETS, EngineStats, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HTTPStats:
    """Requests by endpoint and status, and their latency, counted by the server (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(lambda: Histogram(LATENCY_BUCKETS))

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency[endpoint].observe(seconds)

    def snapshot(self):
        with self._lock:
            return dict(self.requests), {k: h.copy() for k, h in self.latency.items()}


def _labels(**kw) -> str:
    if not kw:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kw.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value, **labels) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def histogram(self, name: str, h: Histogram, **labels) -> None:
        cum = 0
        for b, c in zip(h.buckets, h.counts, strict=False):
            cum += c
            self.sample(f"{name}_bucket", cum, **labels, le=_num(float(b)))
        self.sample(f"{name}_bucket", h.count, **labels, le="+Inf")
        self.sample(f"{name}_sum", h.total, **labels)
        self.sample(f"{name}_count", h.count, **labels)


def render(stats: EngineStats, http: HTTPStats, started: float) -> str:
    w = _Writer()
    requests, latency = http.snapshot()
    w.family("tridlm_http_requests_total", "counter", "HTTP requests by endpoint and status code.")
    for (endpoint, status), n in sorted(requests.items()):
        w.sample("tridlm_http_requests_total", n, endpoint=endpoint, status=status)
    w.family("tridlm_http_request_duration_seconds", "histogram", "HTTP request latency (streams: until the end).")
    for endpoint, h in sorted(latency.items()):
        w.histogram("tridlm_http_request_duration_seconds", h, endpoint=endpoint)

    w.family("tridlm_requests_total", "counter", "Generation requests by outcome.")
    for outcome, n in sorted(stats.requests.items()):
        w.sample("tridlm_requests_total", n, outcome=outcome)
    w.family("tridlm_auto_mode_choices_total", "counter", 'Modes chosen for mode="auto" requests.')
    for mode, n in sorted(stats.auto_choices.items()):
        w.sample("tridlm_auto_mode_choices_total", n, mode=mode)
    modes = sorted(set(stats.generated_tokens) | set(stats.forwards))
    w.family("tridlm_generated_tokens_total", "counter", "Generated tokens by mode.")
    for m in modes:
        w.sample("tridlm_generated_tokens_total", stats.generated_tokens[m], mode=m)
    w.family("tridlm_forwards_total", "counter", "Decode forwards by mode, counted per row (prefill apart).")
    for m in modes:
        w.sample("tridlm_forwards_total", stats.forwards[m], mode=m)
    w.family("tridlm_prefill_forwards_total", "counter", "Prefill forwards by mode, counted per row.")
    for m in modes:
        w.sample("tridlm_prefill_forwards_total", stats.prefill_forwards[m], mode=m)
    w.family("tridlm_tokens_per_forward", "gauge", "Generated tokens / decode forwards since start, by mode.")
    for m in modes:
        if stats.forwards[m]:
            w.sample("tridlm_tokens_per_forward", stats.generated_tokens[m] / stats.forwards[m], mode=m)
    w.family("tridlm_acceptance_length", "histogram", "Tokens emitted per self-speculation verification.")
    for m, h in sorted(stats.acceptance.items()):
        w.histogram("tridlm_acceptance_length", h, mode=m)
    w.family("tridlm_batch_forwards_total", "counter", "Model calls; each serves every running row.")
    w.sample("tridlm_batch_forwards_total", stats.batch_forwards)
    w.family("tridlm_batch_rows_total", "counter", "Rows summed over model calls (mean batch = this / forwards).")
    w.sample("tridlm_batch_rows_total", stats.batch_rows)

    w.family("tridlm_request_latency_seconds", "histogram", "Submission to last token, by mode.")
    for m, h in sorted(stats.latency.items()):
        w.histogram("tridlm_request_latency_seconds", h, mode=m)
    w.family("tridlm_time_to_first_token_seconds", "histogram", "Submission to the first final token, by mode.")
    for m, h in sorted(stats.first_token.items()):
        w.histogram("tridlm_time_to_first_token_seconds", h, mode=m)
    w.family("tridlm_queue_wait_seconds", "histogram", "Submission to admission into the batch.")
    w.histogram("tridlm_queue_wait_seconds", stats.queue_wait)

    w.family("tridlm_active_requests", "gauge", "Requests submitted and not yet finished or cancelled.")
    w.sample("tridlm_active_requests", stats.active_requests)
    w.family("tridlm_running_rows", "gauge", "Rows in the decoding batch.")
    w.sample("tridlm_running_rows", stats.running_rows)
    w.family("tridlm_queue_depth", "gauge", "Rows waiting for a batch slot.")
    w.sample("tridlm_queue_depth", stats.waiting_rows)
    w.family("tridlm_uptime_seconds", "gauge", "Seconds since the server started.")
    w.sample("tridlm_uptime_seconds", time.time() - started)
    return "\n".join(w.lines) + "\n"
