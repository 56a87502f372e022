"""GET /metrics, read back with prometheus_client's parser.

The metric names, their label names and the histograms' bucket bounds are a contract: dashboards and
alerts are written against them, so they are spelled out here rather than read from the code.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import tiny_text_model
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tridlm.server import EngineConfig, ServerConfig, ServerThread, create_app

LATENCY = ("0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "120.0", "+Inf")
ACCEPTANCE = ("1.0", "2.0", "3.0", "4.0", "6.0", "8.0", "12.0", "16.0", "24.0", "32.0", "64.0", "+Inf")
# family name as the parser reports it (counters without _total) -> type, label names, bucket bounds
CONTRACT = {
    "tridlm_http_requests": ("counter", ("endpoint", "status"), None),
    "tridlm_http_request_duration_seconds": ("histogram", ("endpoint",), LATENCY),
    "tridlm_requests": ("counter", ("outcome",), None),
    "tridlm_auto_mode_choices": ("counter", ("mode",), None),
    "tridlm_speculation_off": ("counter", ("mode",), None),
    "tridlm_generated_tokens": ("counter", ("mode",), None),
    "tridlm_forwards": ("counter", ("mode",), None),
    "tridlm_prefill_forwards": ("counter", ("mode",), None),
    "tridlm_tokens_per_forward": ("gauge", ("mode",), None),
    "tridlm_acceptance_length": ("histogram", ("mode",), ACCEPTANCE),
    "tridlm_batch_forwards": ("counter", (), None),
    "tridlm_batch_rows": ("counter", (), None),
    "tridlm_request_latency_seconds": ("histogram", ("mode",), LATENCY),
    "tridlm_time_to_first_token_seconds": ("histogram", ("mode",), LATENCY),
    "tridlm_queue_wait_seconds": ("histogram", (), LATENCY),
    "tridlm_active_requests": ("gauge", (), None),
    "tridlm_running_rows": ("gauge", (), None),
    "tridlm_queue_depth": ("gauge", (), None),
    "tridlm_uptime_seconds": ("gauge", (), None),
}
MODES = ("ar", "diffusion", "spec", "spec-quadratic", "auto")


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family, name: str, **labels) -> float:
    return next(s.value for s in family.samples if s.name == name and s.labels == labels)


@pytest.fixture(scope="module")
def scraped(one_thread):
    """/metrics after one request in every mode, a rejected one and one to an unknown path."""
    server = ServerThread(create_app(tiny_text_model(), config=ServerConfig(model_name="tiny"))).start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as h:
            for mode in MODES:
                extra = {} if mode in ("ar", "auto") else {"block_length": 4}
                r = h.post("/v1/completions", json={"prompt": "O", "max_tokens": 6, "temperature": 0, "mode": mode,
                                                    "ignore_eos": True, **extra})
                assert r.status_code == 200, r.text
            assert h.post("/v1/completions", json={"prompt": "O", "max_tokens": -1}).status_code == 400
            assert h.get("/no-such-path").status_code == 404
            r = h.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return families(r.text)
    finally:
        server.stop()


def test_metric_names_types_and_labels_are_the_contract(scraped):
    assert sorted(scraped) == sorted(CONTRACT)
    for name, (kind, labels, _) in CONTRACT.items():
        family = scraped[name]
        assert family.type == kind, name
        assert family.samples, name  # every family has a series after a request in every mode
        for s in family.samples:
            assert tuple(sorted(set(s.labels) - {"le"})) == labels, (name, s)


def test_histograms_keep_their_bucket_bounds(scraped):
    for name, (kind, _, bounds) in CONTRACT.items():
        if kind != "histogram":
            continue
        series: dict[tuple, list] = {}
        for s in scraped[name].samples:
            if s.name == name + "_bucket":
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                series.setdefault(key, []).append((s.labels["le"], s.value))
        assert series, name
        for key, buckets in series.items():
            assert tuple(le for le, _ in buckets) == bounds, (name, key)
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), (name, key)  # cumulative
            assert counts[-1] == value(scraped[name], name + "_count", **dict(key)), (name, key)


def test_counts_match_the_requests_made(scraped):
    http = scraped["tridlm_http_requests"]
    assert value(http, "tridlm_http_requests_total", endpoint="/v1/completions", status="200") == len(MODES)
    assert value(http, "tridlm_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value(http, "tridlm_http_requests_total", endpoint="other", status="404") == 1
    assert value(scraped["tridlm_requests"], "tridlm_requests_total", outcome="finished") == len(MODES)
    assert sum(s.value for s in scraped["tridlm_auto_mode_choices"].samples) == 1  # one mode="auto" request
    assert sum(s.value for s in scraped["tridlm_generated_tokens"].samples) == 6 * len(MODES)
    assert value(scraped["tridlm_active_requests"], "tridlm_active_requests") == 0


def test_each_app_counts_on_its_own_registry():
    """Two apps in one process: no clash on creation, and neither sees the other's requests."""
    model = tiny_text_model()
    first, second = (TestClient(create_app(model)) for _ in range(2))  # no lifespan: the engines stay idle
    assert first.get("/health").status_code == 200 and first.get("/health").status_code == 200
    seen = [families(c.get("/metrics").text)["tridlm_http_requests"] for c in (first, second)]
    assert value(seen[0], "tridlm_http_requests_total", endpoint="/health", status="200") == 2
    assert not any(s.labels.get("endpoint") == "/health" for s in seen[1].samples)


def test_multiprocess_mode_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="one process"):
        create_app(tiny_text_model(), config=ServerConfig(engine=EngineConfig()))
