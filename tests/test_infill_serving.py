"""Infill and revise rows in the serving engine (what a `suffix` on /v1/completions and /v1/revise run).

The server asks the engine for these rows through `submit(kind=..., **row_options)`; these tests do the
same and check what a client would receive."""

from __future__ import annotations

import pytest
from test_infill_support import text_model  # noqa: F401  (fixture)

from tridlm.decoding import GenerationParams
from tridlm.edit import infill, revise, revision_body
from tridlm.engine import Delta, Engine, Failed, Finished

pytestmark = pytest.mark.usefixtures("one_thread")


def serve(model, prompt, kind, params, **row_options):
    engine = Engine(model, model.tokenizer)
    try:
        req = engine.submit([prompt], params.replace(max_new_tokens=6, block_length=4), kind=kind, **row_options)
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

    req, text, reason = serve(model, prompt, "infill", GenerationParams(mode=mode, stop=("\n",), seed=0),
                              suffix_ids=suffix)
    direct = infill(model, prompt, suffix, max_length=6, stop=["\n"], mode=mode, block_length=4, seed=0)
    assert text == tok.decode(direct.fill_ids[0]) and reason == direct.finish_reason
    assert "\n" not in text


def test_a_revision_request():
    model = text_model(seed=2)
    tok = model.tokenizer
    body_ids, pre = tok.encode("return a + b"), tok.encode("def add(a, b):\n    ")

    req, text, reason = serve(model, body_ids, "revise", GenerationParams(mode="diffusion", temperature=1.0, seed=3),
                              prefix_ids=pre, budget=2, rounds=2)
    out = revision_body(req.rows[0], tok)
    direct = revise(model, body_ids, prefix=pre, budget=2, rounds=2, temperature=1.0, seed=3)
    assert out["ids"] == direct.ids and text == out["text"] and reason == "stop"
    assert [c["position"] for c in out["changes"]] == [c.position for c in direct.changes]
    assert out["selected"] == direct.selected


def test_every_request_is_built_by_one_factory_that_refuses_what_it_does_not_know():
    from tridlm.decoding import GenerationError
    from tridlm.rows import make_row

    model = text_model(seed=3)
    params = GenerationParams(mode="diffusion", max_new_tokens=4, block_length=4)
    assert type(make_row("generate", [5, 6], params, model.config)).__name__ == "Row"
    assert type(make_row("infill", [5, 6], params, model.config, suffix_ids=[7])).__name__ == "InfillRow"
    assert type(make_row("revise", [5, 6], params, model.config)).__name__ == "ReviseRow"
    with pytest.raises(GenerationError, match="unknown request kind 'beam'; choose one of generate, infill, revise"):
        make_row("beam", [5, 6], params, model.config)
    with pytest.raises(GenerationError, match="a generate request takes no option suffix_ids"):
        make_row("generate", [5, 6], params, model.config, suffix_ids=[7])
