"""The serving engine without HTTP: continuous batching, mode "auto", cancellation, queue limits, failures."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_model

from tridlm.decoding import GenerationError, GenerationParams
from tridlm.engine import Delta, Engine, EngineConfig, Failed, Finished, QueueFull


@pytest.fixture(scope="module")
def model():
    return random_model(seed=1)


def prompts(k: int, length: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (length + i % 3,), generator=g).tolist() for i in range(k)]


def collect(req, timeout: float = 60.0):
    ids, reasons, failed = [[] for _ in req.rows], [None] * len(req.rows), None
    for ev in req.iter_events(timeout=timeout):
        if isinstance(ev, Delta):
            ids[ev.index] += ev.ids
        elif isinstance(ev, Finished):
            reasons[ev.index] = ev.reason
        elif isinstance(ev, Failed):
            failed = ev.message
    return ids, reasons, failed


CASES = [("ar", {}), ("diffusion", {"block_length": 4}), ("spec", {"block_length": 5}),
         ("spec-quadratic", {"block_length": 3}), ("diffusion", {"block_length": 6, "steps": 2}),
         ("spec", {"block_length": 4, "threshold": 0.5})]


def test_requests_joining_a_running_batch_decode_as_alone(model):
    ps = prompts(len(CASES), seed=2)
    want = [model.generate(p, mode, max_new_tokens=12, ignore_eos=True, **kw).ids
            for p, (mode, kw) in zip(ps, CASES, strict=True)]
    # fewer slots than requests: some wait; every spec request speculates whatever the load
    engine = Engine(model, config=EngineConfig(max_running=3, spec_off_at=None))
    try:
        reqs = [engine.submit([p], GenerationParams(mode=mode, max_new_tokens=12, ignore_eos=True, **kw))
                for p, (mode, kw) in zip(ps, CASES, strict=True)]
        got = [collect(r) for r in reqs]
        assert [g[0][0] for g in got] == want
        assert all(g[1] == ["length"] and g[2] is None for g in got)
        s = engine.stats()
        assert s.active_requests == 0 and s.running_rows == 0 and s.requests["finished"] == len(CASES)
        assert s.batch_rows > s.batch_forwards  # rows did share forwards
    finally:
        engine.close()


def test_n_rows_take_seeds_from_the_request_seed(model):
    p = prompts(1, seed=3)[0]
    want = model.generate([p, p, p], "ar", max_new_tokens=8, temperature=0.9, seed=11, ignore_eos=True)
    engine = Engine(model)
    try:
        req = engine.submit([p], GenerationParams(max_new_tokens=8, temperature=0.9, seed=11, ignore_eos=True), n=3)
        assert collect(req)[0] == [r.ids for r in want.rows]
    finally:
        engine.close()


def test_auto_mode_follows_the_load_and_validation_comes_first(model):
    engine = Engine(model, config=EngineConfig(auto_spec_below=2, max_running=1, max_queue=2), start=False)
    p = prompts(1)[0]
    auto = GenerationParams(mode="auto", max_new_tokens=4)
    assert engine.submit([p], auto).mode == "spec"  # load 0
    assert engine.submit([p], auto).mode == "spec"  # load 1
    assert engine.submit([p], auto).mode == "ar"  # load 2: at the threshold
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([p], auto)
    with pytest.raises(GenerationError, match="threshold"):
        engine.submit([p], GenerationParams(mode="diffusion", threshold=2.0))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.submit([[5, 999]], GenerationParams())
    with pytest.raises(GenerationError, match="n x prompts"):
        engine.submit([p], GenerationParams(), n=100)
    s = engine.stats()
    assert (s.waiting_rows, s.active_requests, dict(s.auto_choices)) == (3, 3, {"spec": 2, "ar": 1})
    engine.close()


def test_greedy_speculation_decodes_as_ar_under_load(model):
    """At spec_off_at rows or more, an explicit greedy spec request runs as AR (its text is AR's either
    way); sampled ones, auto's own choice and a disabled limit keep speculating."""
    ps = prompts(4, seed=9)
    engine = Engine(model, config=EngineConfig(spec_off_at=2, max_running=8), start=False)
    greedy = GenerationParams(mode="spec", block_length=4, max_new_tokens=10, ignore_eos=True)
    quadratic = greedy.replace(mode="spec-quadratic", block_length=3)
    reqs = [engine.submit([ps[0]], greedy), engine.submit([ps[1]], quadratic),  # loads 0 and 1: speculate
            engine.submit([ps[2]], greedy), engine.submit([ps[3]], quadratic)]  # loads 2 and 3: AR
    sampled = engine.submit([ps[0]], greedy.replace(temperature=0.8, seed=1))
    assert [r.mode for r in reqs] == ["spec", "spec-quadratic", "ar", "ar"] and sampled.mode == "spec"
    assert [r.asked_mode for r in reqs] == ["spec", "spec-quadratic", "spec", "spec-quadratic"]
    engine.start()
    try:
        got = [collect(r)[0][0] for r in reqs]
        collect(sampled)
        assert got[2:] == [model.generate(p, "ar", max_new_tokens=10, ignore_eos=True).ids for p in ps[2:]]
        s = engine.stats()
        assert dict(s.speculation_off) == {"spec": 1, "spec-quadratic": 1}
        assert s.forwards["ar"] == 2 * 10  # one decode forward per token and row: no speculation ran
    finally:
        engine.close()
    never = Engine(model, config=EngineConfig(spec_off_at=None), start=False)
    assert [never.submit([p], greedy).mode for p in ps] == ["spec"] * 4
    never.close()


def test_auto_mode_speculates_only_while_it_decodes_faster_alone(model):
    """Light load: spec until auto_probe of its tokens were timed alone, then AR until AR was timed too,
    then whichever decoded faster alone (the other choices -- load, acceptance -- stay as they were)."""
    engine = Engine(model, config=EngineConfig(auto_probe=8, auto_min_acceptance=0.0), start=False)
    s = engine.scheduler.stats
    assert engine.choose_mode(0) == "spec"
    s.count_solo("spec", 0.5, 8)
    assert engine.choose_mode(0) == "ar"  # AR not timed yet: a light-load request times it
    s.count_solo("ar", 0.1, 4)
    assert engine.choose_mode(0) == "ar"  # still fewer than auto_probe AR tokens
    s.count_solo("ar", 0.1, 4)
    assert engine.choose_mode(0) == "ar"  # AR 25 ms a token alone, spec 62.5
    s.count_solo("spec", 0.0, 40)
    assert engine.choose_mode(0) == "spec"  # spec now 10.4 ms a token
    assert engine.choose_mode(4) == "ar"  # the load still decides first
    engine.close()


def test_one_row_decode_forwards_time_each_mode_alone(model):
    engine = Engine(model)
    try:
        p = prompts(1, seed=12)[0]
        collect(engine.submit([p], GenerationParams(mode="ar", max_new_tokens=9, ignore_eos=True)))
        seconds, tokens = engine.stats().solo_decode["ar"]
        assert tokens == 9 and seconds > 0  # every token came from a forward that held this row alone
    finally:
        engine.close()


def test_cancel_frees_the_rows_and_the_rest_go_on(model):
    ps = prompts(3, seed=4)
    want = model.generate(ps[1], "spec", max_new_tokens=20, ignore_eos=True, block_length=4).ids
    engine = Engine(model, start=False)
    params = GenerationParams(mode="spec", max_new_tokens=20, ignore_eos=True, block_length=4)
    long = engine.submit([ps[0]], params.replace(max_new_tokens=100))
    keep = engine.submit([ps[1]], params)
    waiting = engine.submit([ps[2]], params)
    waiting.cancel()  # cancelled before it ever ran
    engine.start()
    first = next(long.iter_events(timeout=60))
    assert isinstance(first, Delta)
    long.cancel()
    assert isinstance(list(long.iter_events(timeout=60))[-1], Failed)
    assert collect(keep)[0] == [want]
    engine.close()
    s = engine.stats()
    assert s.active_requests == 0 and s.requests["cancelled"] == 2 and s.requests["finished"] == 1


def test_a_failing_step_fails_its_batch_and_the_engine_keeps_serving(model):
    p = prompts(1, seed=5)[0]
    want = model.generate(p, "ar", max_new_tokens=6, ignore_eos=True).ids
    engine = Engine(model)
    boom = threading.Event()
    forward = model.forward

    def flaky(*a, **kw):
        if not boom.is_set():
            boom.set()
            raise RuntimeError("injected fault")
        return forward(*a, **kw)

    model.forward = flaky
    try:
        bad = collect(engine.submit([p], GenerationParams(max_new_tokens=6, ignore_eos=True)))
        assert "injected fault" in bad[2]
        assert collect(engine.submit([p], GenerationParams(max_new_tokens=6, ignore_eos=True)))[0] == [want]
        assert engine.stats().requests["failed"] == 1
    finally:
        del model.forward
        engine.close()


def test_a_long_prompt_joining_beside_a_row_near_its_end(model):
    """Padding to the joining row's prefill makes the old row write past the room it asked for."""
    from tridlm.decoding import DecodeBatch, Row

    short, long = [5, 6, 7, 8], list(range(4, 24))
    p1 = GenerationParams(max_new_tokens=40, ignore_eos=True, block_length=1)
    p2 = p1.replace(max_new_tokens=12)
    want = [model.generate(short, "ar", max_new_tokens=40, ignore_eos=True).ids,
            model.generate(long, "ar", max_new_tokens=12, ignore_eos=True).ids]
    r1, r2 = Row(short, p1, model.config), Row(long, p2, model.config)
    batch = DecodeBatch(model, [r1])
    with torch.inference_mode():
        for _ in range(35):
            batch.step()
        batch.add(r2)
        while not batch.done:
            batch.step()
    assert [r1.output, r2.output] == want


def test_auto_mode_stops_speculating_when_drafts_are_rejected(model):
    """A random model's drafts are almost never accepted: after the probe, auto picks AR even when idle."""
    engine = Engine(model, config=EngineConfig(auto_probe=4, auto_min_acceptance=2.0))
    p = prompts(1, seed=6)[0]
    try:
        assert engine.choose_mode(0) == "spec"
        collect(engine.submit([p], GenerationParams(mode="spec", block_length=4, max_new_tokens=12, ignore_eos=True)))
        h = engine.stats().acceptance["spec"]
        assert h.count >= 4 and h.total / h.count < 2.0
        req = engine.submit([p], GenerationParams(mode="auto", max_new_tokens=4))
        assert req.mode == "ar"
        collect(req)
    finally:
        engine.close()


def test_a_request_that_does_not_stream_gets_no_deltas_and_its_rows_whole(model):
    """stream=False: nothing is sent for a row until it ends; its Finished event then carries the row's text,
    and its ids are the ones a streaming request's Deltas carry."""
    engine = Engine(model, config=EngineConfig(max_running=4))
    try:
        params = GenerationParams(mode="ar", max_new_tokens=9, ignore_eos=True)
        streamed = engine.submit(prompts(1, seed=5), params, n=2)
        whole = engine.submit(prompts(1, seed=5), params, n=2, stream=False)
        events = list(whole.iter_events(timeout=60))
        assert [type(e) for e in events] == [Finished, Finished]
        assert all(e.text == whole.rows[e.index].text for e in events)
        ids, reasons, failed = collect(streamed)
        assert ids == [list(r.output) for r in whole.rows] and reasons == ["length"] * 2 and failed is None
    finally:
        engine.close()
