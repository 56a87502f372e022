"""Infill and revise rows in the serving engine (what a `suffix` on /v1/completions and /v1/revise run).

The server hands the engine these rows through `submit(build_row=...)`; these tests do the same and
check what a client would receive."""

from __future__ import annotations

import pytest
from test_infill_support import text_model  # noqa: F401  (fixture)

from tridlm.decoding import GenerationParams
from tridlm.engine import Delta, Engine, Failed, Finished
from tridlm.infill import infill, infill_row, revise, revise_row, revision_body

pytestmark = pytest.mark.usefixtures("one_thread")


def serve(model, build):
    engine = Engine(model, model.tokenizer)
    try:
        req = engine.submit([[5, 6]], GenerationParams(mode="diffusion", max_new_tokens=6, block_length=4),
                            build_row=lambda prompt, params, seed: build(prompt, params))
        text, reason = "", None
        for ev in req.iter_events(timeout=60):
            if isinstance(ev, Delta):
                text += ev.text
            elif isinstance(ev, Finished):
                reason = ev.reason
            elif isinstance(ev, Failed):
                raise AssertionError(ev.message)
        return req, text, reason
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_a_completion_with_a_suffix_streams_the_middle(mode):
    model = text_model(seed=1)
    tok = model.tokenizer
    prompt, suffix = tok.encode("def add(a, b):\n    return "), tok.encode("\n\nprint(add(1, 2))\n")

    def build(_, params):
        return infill_row(prompt, suffix, params.replace(mode=mode, stop=("\n",)), model.config, tok, seed=0)

    req, text, reason = serve(model, build)
    direct = infill(model, prompt, suffix, max_length=6, stop=["\n"], mode=mode, block_length=4, seed=0)
    assert text == tok.decode(direct.fill_ids[0]) and reason == direct.finish_reason
    assert "\n" not in text


def test_a_revision_request():
    model = text_model(seed=2)
    tok = model.tokenizer
    body_ids, pre = tok.encode("return a + b"), tok.encode("def add(a, b):\n    ")

    def build(_, params):
        return revise_row(body_ids, params.replace(temperature=1.0, seed=3), model.config, tok, seed=3,
                          prefix_ids=pre, budget=2, rounds=2)

    req, text, reason = serve(model, build)
    out = revision_body(req.rows[0], tok)
    direct = revise(model, body_ids, prefix=pre, budget=2, rounds=2, temperature=1.0, seed=3)
    assert out["ids"] == direct.ids and text == out["text"] and reason == "stop"
    assert [c["position"] for c in out["changes"]] == [c.position for c in direct.changes]
    assert out["selected"] == direct.selected
