"""A live server on 127.0.0.1, driven with the official openai client (and raw HTTP for bad input).

Every greedy output is compared exactly with `model.generate()` on the same prompt and knobs: the
server decodes with the same rows and batch runner, so any difference is a bug.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tridlm.decoding.block_length import CANDIDATES
from tridlm.server import EngineConfig, Limits, ServerConfig, ServerThread, create_app
from tridlm.server.prompts import chat_prompt
from tridlm.server.schemas import ChatCompletionRequest

NAME = "tiny"
KEY = "sekret-key"
MODES = ("ar", "diffusion", "spec", "spec-quadratic")
KNOBS = {"ar": {}, "diffusion": {"block_length": 4}, "spec": {"block_length": 4},
         "spec-quadratic": {"block_length": 4}}


def start(model, **config) -> ServerThread:
    return ServerThread(create_app(model, config=ServerConfig(model_name=NAME, **config))).start()


@pytest.fixture(scope="module")
def live(tiny_trained, tmp_path_factory):
    """(server, model): the tiny model behind a server with small caps, so the limits are testable."""
    model, _, _ = tiny_trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIDLM_CACHE", str(tmp_path_factory.mktemp("tridlm_cache")))  # block_length "auto" profiles
        server = start(model, max_body_bytes=64 * 1024, limits=Limits(max_tokens_cap=256, max_n=4),
                       engine=EngineConfig(max_running=16, max_queue=256, auto_min_acceptance=0))
        yield server, model
        server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live[0].url, timeout=120) as c:
        yield c


def reference(model, prompt, mode, max_tokens, **kw):
    return model.generate(prompt, mode, max_new_tokens=max_tokens, **kw)


def chat_reference(model, messages, mode, max_tokens, **kw):
    ids, stop_ids, _ = chat_prompt(ChatCompletionRequest(messages=messages), model.tokenizer, model.config)
    return model.generate(ids, mode, max_new_tokens=max_tokens, stop_token_ids=stop_ids, **kw)


# -- the endpoints with the openai client ---------------------------------------------------------
def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["active_requests"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_completion_in_every_mode_equals_generate(live, client, mode):
    model = live[1]
    r = client.completions.create(model=NAME, prompt="ROMEO:\n", max_tokens=12, temperature=0,
                                  extra_body={"mode": mode, **KNOBS[mode]})
    want = reference(model, "ROMEO:\n", mode, 12, **KNOBS[mode])
    assert r.choices[0].text == want.text and want.text
    assert r.choices[0].finish_reason == {"length": "length"}.get(want.finish_reason, "stop")
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(want.rows[0].prompt_ids), len(want.ids))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert r.mode == u.mode == mode
    assert u.forwards == want.metrics.rows[0].forwards
    assert u.tokens_per_forward == pytest.approx(want.metrics.tokens_per_forward)
    assert (u.mean_acceptance is None) == (mode in ("ar", "diffusion"))


@pytest.mark.parametrize("knobs", [
    {"mode": "diffusion", "block_length": 8, "steps": 2, "selection_policy": "margin"},
    {"mode": "diffusion", "block_length": 6, "threshold": 0.3, "steps": 3, "selection_policy": "entropy"},
    {"mode": "spec", "block_length": 6, "threshold": 0.5, "top_k": 5},
])
def test_every_knob_reaches_the_decoder(live, client, knobs):
    """Per-request knobs are honoured, not dropped (forwards and text match generate() with them)."""
    model = live[1]
    r = client.completions.create(model=NAME, prompt="KING:\n", max_tokens=16, temperature=0, extra_body=knobs)
    kw = {k: v for k, v in knobs.items() if k != "mode"}
    want = reference(model, "KING:\n", knobs["mode"], 16, **kw)
    assert r.choices[0].text == want.text
    assert r.usage.forwards == want.metrics.rows[0].forwards and r.usage.block_length == knobs["block_length"]
    plain = reference(model, "KING:\n", knobs["mode"], 16, block_length=knobs["block_length"])
    assert r.usage.forwards != plain.metrics.rows[0].forwards  # the knobs did change the decoding


def test_usage_says_the_block_length_that_ran_when_none_was_asked(live, client):
    """No block_length in the request: the checkpoint's own block size runs, and usage says so."""
    r = client.completions.create(model=NAME, prompt="KING:\n", max_tokens=8, temperature=0,
                                  extra_body={"mode": "diffusion"})
    assert r.usage.block_length == live[1].config.block_size
    assert r.choices[0].text == reference(live[1], "KING:\n", "diffusion", 8).text


def test_auto_mode_says_what_it_chose_and_keeps_the_greedy_text(live, client):
    r = client.completions.create(model=NAME, prompt="KING:\n", max_tokens=12, temperature=0,
                                  extra_body={"mode": "auto"})
    assert r.mode == r.usage.mode == "spec"  # an idle server speculates
    assert r.choices[0].text == reference(live[1], "KING:\n", "ar", 12).text


@pytest.mark.parametrize("mode", ["spec", "diffusion"])
def test_block_length_auto_is_what_generate_resolves(live, client, mode):
    r = client.completions.create(model=NAME, prompt="KING:\n", max_tokens=10, temperature=0,
                                  extra_body={"mode": mode, "block_length": "auto"})
    want = reference(live[1], "KING:\n", mode, 10, block_length="auto")
    assert r.usage.block_length in CANDIDATES
    assert r.choices[0].text == want.text and r.usage.forwards == want.metrics.rows[0].forwards


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_chat_uses_the_template_and_equals_generate(live, client, mode):
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"mode": mode, **KNOBS[mode]})
    want = chat_reference(live[1], messages, mode, 12, **KNOBS[mode])
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(want.ids) and r.usage.mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_streamed_completion_is_the_same_text_in_final_pieces(live, client, mode):
    kw = dict(model=NAME, prompt="First Citizen:\n", max_tokens=16, temperature=0,
              extra_body={"mode": mode, **KNOBS[mode]})
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(live[1], "First Citizen:\n", mode, 16, **KNOBS[mode]).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.mode == mode


def test_streamed_chat_has_role_then_content_and_usage_on_the_last_chunk(live, client):
    messages = [{"role": "user", "content": "Speak."}]
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"mode": "spec", "block_length": 4}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == chat_reference(live[1], messages, "spec", 16, block_length=4).text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_n_seed_stop_and_token_prompts(live, client):
    model = live[1]
    r = client.completions.create(model=NAME, prompt="To be", max_tokens=10, temperature=0.8, seed=7, n=2,
                                  extra_body={"mode": "ar"})
    want = model.generate(["To be", "To be"], "ar", max_new_tokens=10, temperature=0.8, seed=7)
    assert [c.text for c in r.choices] == want.texts and [c.index for c in r.choices] == [0, 1]
    ids = model.tokenizer.encode("To be", add_special_tokens=True)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == reference(model, ids, "ar", 10).text
    full = reference(model, "To be", "ar", 24, ignore_eos=True).text
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].strip())
    r = client.completions.create(model=NAME, prompt="To be", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"mode": "spec", "block_length": 4, "ignore_eos": True})
    assert r.choices[0].text == reference(model, "To be", "ar", 24, stop=(stop,), ignore_eos=True).text
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"


# -- many clients at once -----------------------------------------------------------------------------
def test_32_clients_4_requests_each_mixed_modes_equal_alone(live, client):
    model = live[1]
    texts = ["ROMEO:\n", "To be, or", "KING:\n", "O", "First Citizen:\nBefore we proceed any further, hear me speak.\n",
             "What", "My lord", "Good"]
    modes = [*MODES, "auto"]
    jobs = [(texts[(c + k) % len(texts)], modes[(c * 4 + k) % len(modes)], 4 + (c + k) % 3 * 4)
            for c in range(32) for k in range(4)]

    def ask(job):
        prompt, mode, max_tokens = job
        knobs = {"block_length": 2} if mode == "ar" else KNOBS.get(mode, {})  # AR: little spare cache room
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"mode": mode, **knobs})
        return r.choices[0].text, r.mode

    alone = {}
    for job in sorted(set(jobs)):  # each distinct request, sent alone
        alone[job] = ask(job)[0]

    def one_client(c):
        return [ask(job) for job in jobs[c * 4:(c + 1) * 4]]

    with ThreadPoolExecutor(32) as pool:
        results = [x for xs in pool.map(one_client, range(32)) for x in xs]
    assert [t for t, _ in results] == [alone[j] for j in jobs]
    chosen = {m for (_, mode, _), (_, m) in zip(jobs, results, strict=True) if mode == "auto"}
    assert chosen <= {"spec", "ar"}
    for (prompt, mode, n), text in alone.items():  # and "alone" is generate()
        ref_mode = "ar" if mode == "auto" else mode
        assert text == reference(model, prompt, ref_mode, n, **KNOBS[ref_mode]).text


# -- limits and errors ------------------------------------------------------------------------------
def post(http, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize("body,status,param,words", [
    (b'{"prompt": "x", ', 400, None, "malformed JSON"),
    (b'[1, 2]', 400, None, "must be an object"),
    (b'{"prompt": "x", "temperature": NaN}', 400, None, "NaN"),
    ({"prompt": "x", "mode": "fast"}, 400, "mode", "unknown mode 'fast'"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature must lie in [0, 100]"),
    ({"prompt": "x", "temperature": 1e308}, 400, "temperature", "temperature must lie in [0, 100]"),
    ({"prompt": "x", "seed": 1 << 64}, 400, "seed", "seed must be an integer in [0, 2**64 - 1]"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed must be an integer in [0, 2**64 - 1]"),
    ({"prompt": "x", "block_length": "8"}, 400, "block_length", "block_length"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": [True, False]}, 400, "prompt", None),
    ({"prompt": "x", "mode": "diffusion", "block_length": 20000}, 400, "block_length", "[1, 1024]"),
    ({"prompt": "x", "mode": "diffusion", "block_length": 1e9}, 400, "block_length", "block_length"),
    ({"prompt": "x", "mode": "spec-quadratic", "block_length": 32}, 400, "block_length", "forwards of 1056 tokens"),
    (b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400, None, "nested too deeply"),
    (b'{"prompt": "\\ud800 x"}', 400, None, "surrogate"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p"),
    ({"prompt": "x", "threshold": 2}, 400, "threshold", "threshold"),
    ({"prompt": "x", "steps": 0}, 400, "steps", "steps"),
    ({"prompt": "x", "block_length": 0}, 400, "block_length", "block_length"),
    ({"prompt": "x", "block_length": "big"}, 400, "block_length", "block_length"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens", "max_tokens must be <= 256"),
    ({"prompt": "x", "n": 50}, 400, "n", "n must be <= 4"),
    ({"prompt": "x", "selection_policy": "random"}, 400, "selection_policy", "selection_policy"),
    ({"prompt": "x", "stepz": 3}, 400, "stepz", "unrecognized request field"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "logprobs is not supported"),
    ({"max_tokens": 4}, 400, "prompt", "prompt: Field required"),
    ({"prompt": ""}, 400, "prompt", None),
    ({"prompt": [5, 100000]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [5] * 1024}, 400, "prompt", "context window"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
])
def test_bad_completion_requests(http, body, status, param, words):
    r = post(http, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"]
    if words:
        assert words in err["message"]


def test_bad_chat_requests(http):
    too_long = [{"role": "user", "content": "ab " * 2000}]
    r = post(http, "/v1/chat/completions", {"messages": too_long})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "context window" in r.json()["error"]["message"]
    r = post(http, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(http, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_body_size_unknown_routes_and_the_server_keeps_serving(http, live):
    r = post(http, "/v1/completions", {"prompt": "x" * 100_000})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert http.get("/v1/nothing").status_code == 404
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    r = post(http, "/v1/completions", {"prompt": "ROMEO:\n", "max_tokens": 8, "mode": "ar"})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == reference(live[1], "ROMEO:\n", "ar", 8).text


def test_full_queue_is_429_and_a_client_that_gives_up_is_cancelled(tiny_trained):
    model = tiny_trained[0]
    server = start(model, engine=EngineConfig(max_running=1, max_queue=1))
    engine = server.app.state.engine
    try:
        engine.pause()  # hold admission so the queue fills deterministically
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        with ThreadPoolExecutor(2) as pool:  # one row may run, one may wait: both wait while paused
            first = [pool.submit(c.completions.create, model=NAME, prompt="O", max_tokens=4, temperature=0)
                     for _ in range(2)]
            deadline = time.monotonic() + 30
            while engine.stats().waiting_rows < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=NAME, prompt="O", max_tokens=4)
            assert e.value.status_code == 429 and "queue is full" in e.value.message
            engine.resume()
            assert [f.result().choices[0].text for f in first] == [reference(model, "O", "ar", 4).text] * 2
        # a non-streamed request whose client times out while it waits: the server cancels it
        engine.pause()
        with httpx.Client(base_url=server.url, timeout=0.5) as h, pytest.raises(httpx.ReadTimeout):
            h.post("/v1/completions", json={"prompt": "O", "max_tokens": 4})
        deadline = time.monotonic() + 30
        while engine.stats().active_requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats().requests["cancelled"] == 1 and engine.stats().waiting_rows == 0
        engine.resume()
    finally:
        server.stop()


def test_client_disconnect_mid_stream_cancels_the_request(live, http):
    body = {"prompt": "ROMEO:\n", "max_tokens": 256, "mode": "spec", "block_length": 4, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=live[0].url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    # the connection is closed: the server must notice, cancel and free the row
    deadline = time.monotonic() + 30
    while http.get("/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    h = http.get("/health").json()
    assert (h["active_requests"], h["running_rows"], h["waiting_rows"]) == (0, 0, 0)
    assert 'tridlm_requests_total{outcome="cancelled"}' in http.get("/metrics").text


def test_metrics_are_prometheus_text(http, client):
    client.completions.create(model=NAME, prompt="O", max_tokens=6, temperature=0,
                              extra_body={"mode": "spec", "block_length": 4})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in ('tridlm_http_requests_total{endpoint="/v1/completions",status="200"}',
                   'tridlm_http_requests_total{endpoint="/v1/completions",status="400"}',
                   'tridlm_generated_tokens_total{mode="spec"}', 'tridlm_forwards_total{mode="ar"}',
                   'tridlm_tokens_per_forward{mode="spec"}', 'tridlm_acceptance_length_bucket{le="+Inf",mode="spec"}',
                   "tridlm_queue_depth 0", "tridlm_active_requests 0",
                   'tridlm_request_latency_seconds_bucket{le="+Inf",mode="ar"}',
                   'tridlm_time_to_first_token_seconds_count{mode="spec"}'):
        assert needle in text, needle
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# -- auth ---------------------------------------------------------------------------------------------
def test_api_key_required_when_set(tiny_trained):
    model = tiny_trained[0]
    server = start(model, api_key=KEY)
    try:
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0, extra_body={"mode": "diffusion", "block_length": 4})
        assert r.choices[0].message.content == chat_reference(model, [{"role": "user", "content": "Hi"}],
                                                              "diffusion", 4, block_length=4).text
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and "incorrect API key" in e.value.message
        with httpx.Client(base_url=server.url, timeout=60) as h:
            r = h.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
            assert h.get("/health").status_code == 200  # probes need no key
    finally:
        server.stop()


# -- the command line -------------------------------------------------------------------------------
def test_serve_without_model_uses_the_default_model(tiny_trained, monkeypatch, capsys):
    from tridlm import default_model
    from tridlm.cli import build_parser, main
    from tridlm.commands.serve import build_app

    _, _, folder = tiny_trained
    monkeypatch.setattr(default_model, "default_model_paths", lambda: (folder, False))
    app, name = build_app(build_parser().parse_args(["serve"]))
    assert name == "tridlm-default"
    monkeypatch.undo()
    monkeypatch.setattr(default_model, "has_drafter", lambda: False)
    assert main(["serve"]) == 2
    assert "the default model's drafter is missing" in capsys.readouterr().err


def test_serve_builds_the_app_from_a_folder(tiny_trained):
    from tridlm.cli import build_parser
    from tridlm.commands.serve import build_app

    folder = tiny_trained[2]
    args = build_parser().parse_args(["serve", "--model", str(folder), "--default-mode", "spec", "--max-running", "2"])
    app, name = build_app(args)
    assert name == folder.name
    assert app.state.config.limits.default_mode == "spec" and app.state.engine.config.max_running == 2


# -- infilling and revision over HTTP -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_completion_with_a_suffix_is_the_infill_middle(live, client, mode):
    from tridlm.edit import infill

    server, model = live
    prompt, suffix = "The cat sat", " on the mat."
    r = client.completions.create(model=NAME, prompt=prompt, suffix=suffix, max_tokens=6, temperature=0, seed=7,
                                  extra_body={"mode": mode, "block_length": 4})
    direct = infill(model, prompt, suffix, max_length=6, mode=mode, block_length=4, seed=7)
    assert r.choices[0].text == direct.fills[0]
    assert r.choices[0].finish_reason == {"eos": "stop"}.get(direct.finish_reason, direct.finish_reason)


def test_revise_endpoint_equals_model_revise(live, http):
    from tridlm.edit import revise

    server, model = live
    body = {"text": " to be or not to be", "prefix": "Hamlet said", "suffix": ".", "rounds": 2, "budget": 2}
    r = post(http, "/v1/revise", body)
    assert r.status_code == 200, r.text
    out = r.json()
    direct = revise(model, body["text"], prefix=body["prefix"], suffix=body["suffix"], rounds=2, budget=2)
    assert out["object"] == "revision" and out["text"] == direct.text
    assert [c["position"] for c in out["changes"]] == [c.position for c in direct.changes]
    zero = post(http, "/v1/revise", {**body, "budget": 0}).json()
    assert zero["text"] == body["text"] and zero["changes"] == []
    by_alias, by_name = (post(http, "/v1/revise", {**body, name: 0.5}).json() for name in ("threshold",
                                                                                             "remask_threshold"))
    assert by_alias["text"] == by_name["text"] and by_alias["changes"] == by_name["changes"]


@pytest.mark.parametrize("body,param", [
    ({"text": ""}, "text"), ({"text": "x", "rounds": -1}, "rounds"), ({"text": "x", "threshold": 2}, "threshold"),
    ({"text": "x", "budget": -3}, "budget"), ({"text": "x", "stepz": 1}, "stepz"),
    ({"text": "x", "remask_threshold": 1.5}, "remask_threshold"),
    ({"text": "x " * 2000}, "text"),
])
def test_bad_revise_requests(http, body, param):
    r = post(http, "/v1/revise", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
