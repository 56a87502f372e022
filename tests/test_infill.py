"""Fill-in-the-middle: given text is never altered, fixed holes get exactly k tokens, the suffix is seen."""

from __future__ import annotations

import pytest
import torch
from conftest import random_model
from test_infill_support import text_model  # noqa: F401  (fixture)

from tridlm.decoding import DecodeBatch, GenerationError, GenerationParams, Row
from tridlm.decoding.infill import InfillOptions, InfillRow, spread_lengths
from tridlm.tokenizer import fim_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = [5, 6, 7, 8, 9]
SUFFIX = [10, 11, 12]
METHOD_MODES = [("block", "diffusion"), ("rank", "ar"), ("left", "ar"), ("left", "spec"), ("left", "diffusion")]


@pytest.mark.parametrize("method,mode", METHOD_MODES)
@pytest.mark.parametrize("k", [1, 3, 11])
def test_fixed_hole_gets_exactly_k_tokens_and_keeps_both_sides(method, mode, k):
    model = random_model()
    r = model.infill(PREFIX, SUFFIX, length=k, method=method, mode=mode, block_length=4)
    assert len(r.fill_ids[0]) == k
    assert r.ids == PREFIX + r.fill_ids[0] + SUFFIX
    assert model.config.mask_token_id not in r.ids


@pytest.mark.parametrize("method,mode", METHOD_MODES + [("fim", "ar"), ("fim", "spec"), ("fim", "spec-quadratic")])
def test_several_holes_keep_every_segment(method, mode):
    model = text_model(fim=True)
    segments = ["def mul(a, b):\n    ", " = a * b\n    return ", "\n\nprint(", ")\n"]
    r = model.infill(segments=segments, length=[2, 1, 4], method=method, mode=mode, block_length=4)
    assert [len(f) for f in r.fill_ids] == [2, 1, 4]
    assert r.text == segments[0] + r.fills[0] + segments[1] + r.fills[1] + segments[2] + r.fills[2] + segments[3]
    enc = model.tokenizer.encode
    assert r.ids == (enc(segments[0]) + r.fill_ids[0] + enc(segments[1]) + r.fill_ids[1] + enc(segments[2])
                     + r.fill_ids[2] + enc(segments[3]))


@pytest.mark.parametrize("method", ["block", "rank", "left"])
def test_variable_hole_stops_before_the_marker(method):
    model = text_model(seed=1)
    prefix, suffix = "for i in range(10):\n", "\nprint(done)\n"
    r = model.infill(prefix, suffix, max_length=12, stop=["\n"], method=method, mode="ar", temperature=0.0)
    assert r.text.startswith(prefix) and r.text.endswith(suffix)
    assert "\n" not in r.middle
    assert len(r.fill_ids[0]) <= 12
    assert r.finish_reason in ("stop", "eos", "length")


def test_zero_length_hole_and_empty_prefix():
    model = random_model()
    r = model.infill(PREFIX, SUFFIX, length=0)
    assert r.ids == PREFIX + SUFFIX and r.metrics.forwards == 0
    r = model.infill([], SUFFIX, length=3, method="block")
    assert r.ids[3:] == SUFFIX and len(r.ids) == 6


def test_block_fill_sees_the_suffix_only_through_the_window():
    """With suffix_window=0 the suffix cannot matter; with a window it changes the logits, hence what a
    seeded sampler draws (random weights give nearly flat logits: sample, do not take the argmax)."""
    model = random_model(seed=3)
    suffixes = [[10, 11, 12, 13], [40, 41, 42, 43], [20, 30, 50, 60], [15, 25, 35, 45], [61, 62, 63, 4]]

    def fill(sfx, w):
        return model.infill(PREFIX, sfx, length=12, method="block", suffix_window=w, temperature=1.0,
                            seed=0).fill_ids[0]

    assert len({tuple(fill(s, 0)) for s in suffixes}) == 1
    assert len({tuple(fill(s, 4)) for s in suffixes}) > 1


def test_rank_sees_the_suffix_and_keeps_the_likeliest():
    model = random_model(seed=4)
    r = model.infill(PREFIX, SUFFIX, length=3, method="rank", candidates=5, suffix_window=3, seed=0)
    cands = r.candidates[0]
    assert len(cands) >= 2
    best = max(cands, key=lambda c: c["score"])
    assert r.fill_ids[0] == best["ids"]
    greedy = model.generate(PREFIX, "ar", max_new_tokens=3, ignore_eos=True).ids
    assert cands[0]["ids"] == greedy  # the first candidate is plain greedy decoding


def test_left_is_plain_generation_and_fim_decodes_the_fim_prompt():
    model = text_model(fim=True, seed=2)
    tok = model.tokenizer
    prefix, suffix = "def add(a, b):\n", "\n"
    left = model.infill(prefix, suffix, length=5, method="left", mode="ar")
    assert left.fill_ids[0] == model.generate(tok.encode(prefix), "ar", max_new_tokens=5, ignore_eos=True).ids
    ft = fim_tokens(tok)
    prompt = [ft.prefix] + tok.encode(prefix) + [ft.suffix] + tok.encode(suffix) + [ft.middle]
    for mode in ("ar", "spec"):
        fim = model.infill(prefix, suffix, length=5, method="fim", mode=mode, block_length=4)
        assert fim.fill_ids[0] == model.generate(prompt, mode, max_new_tokens=5, ignore_eos=True, block_length=4).ids


def test_auto_method_follows_mode_and_training():
    plain, trained = text_model(), text_model(fim=True)
    assert plain.infill("a", "b", length=1, mode="diffusion").method == "block"
    assert plain.infill("a", "b", length=1, mode="ar").method == "rank"
    assert trained.infill("a", "b", length=1, mode="spec").method == "fim"


def test_infill_rows_batch_with_other_rows_as_if_alone():
    """The scripted rows keep the batch contract: beside AR, diffusion and spec rows, same output."""
    model = random_model(seed=5)
    cfg = model.config
    gp = GenerationParams(mode="diffusion", block_length=4, max_new_tokens=9, ignore_eos=True)

    def rows():
        out = []
        for i, (method, holes) in enumerate([("block", [3, None]), ("rank", [2, 4]), ("left", [None, 2])]):
            opts = InfillOptions(method=method, suffix_window=4, max_length=5, candidates=3)
            out.append(InfillRow([PREFIX, [20, 21], SUFFIX], holes, gp.resolve(cfg), cfg, seed=i, options=opts))
        out += [Row([5, 6, 7, 8, 9, 10], GenerationParams(mode=m, block_length=4, max_new_tokens=9,
                                                            ignore_eos=True), cfg, seed=0)
                for m in ("ar", "diffusion", "spec", "spec-quadratic")]
        return out

    alone = []
    for r in rows():
        b = DecodeBatch(model, [r])
        with torch.inference_mode():
            while not b.done:
                b.step()
        alone.append(r.ids if isinstance(r, InfillRow) else r.output)
    together = rows()
    b = DecodeBatch(model)
    with torch.inference_mode():
        b.add(*together[:3])
        b.step()
        b.add(*together[3:])  # joining mid-run
        while not b.done:
            b.step()
    assert [r.ids if isinstance(r, InfillRow) else r.output for r in together] == alone


def test_bad_requests_fail_before_any_forward():
    model = text_model()
    mask = model.config.mask_token_id
    with pytest.raises(GenerationError, match="lengths"):
        model.infill(segments=["a", "b", "c"], length=[1])
    with pytest.raises(GenerationError, match="mask token"):
        model.infill([5, mask], [6], length=1)
    with pytest.raises(GenerationError, match="method"):
        model.infill("a", "b", length=1, method="magic")
    with pytest.raises(GenerationError, match="FIM"):
        model.infill("a", "b", length=1, method="fim")
    with pytest.raises(GenerationError, match="unknown generation parameter"):
        model.infill("a", "b", length=1, colour="red")
    with pytest.raises(GenerationError, match="context window"):
        model.infill("a", "b", length=600)
    with pytest.raises(GenerationError, match="drafter"):
        model.infill("a", "b", length=1, drafter=True)


def test_spread_lengths():
    assert spread_lengths(32, 6) == [1, 2, 4, 8, 16, 32]
    assert spread_lengths(5, 1) == [5]


def test_stop_strings_may_count_only_after_the_first_characters():
    """A hole that starts with a newline (BPE merges it with the next line's indent) ends at the next one."""
    model = text_model()
    tok = model.tokenizer
    cfg = model.config
    gp = GenerationParams(mode="ar").resolve(cfg)
    ids = tok.encode("\n    x = 1\n    y = 2")
    for after, expect in ((0, ""), (1, "\n    x = 1")):
        row = InfillRow([[5], [6]], [None], gp, cfg, tok, options=InfillOptions(method="left", stop=("\n",),
                                                                               stop_after=after))
        assert row._stopped(ids) and row._cut(ids, 48) == (tok.encode(expect), "stop")
    r = model.infill("x = 0", "\nz = 3\n", max_length=8, stop=["\n"], stop_after=1, method="left", mode="ar")
    assert "\n" not in r.middle[1:] and r.text.endswith("\nz = 3\n")


def test_a_seed_makes_sampled_infilling_and_revision_repeatable():
    model = text_model(seed=4)
    fills = [model.infill("def f(x):\n    return ", "\n", max_length=8, mode="ar", method="rank", seed=11,
                          temperature=1.0).fill_ids for _ in range(2)]
    assert fills[0] == fills[1]
    revised = [model.revise("return x + 1", budget=3, temperature=1.0, seed=5).ids for _ in range(2)]
    assert revised[0] == revised[1]
