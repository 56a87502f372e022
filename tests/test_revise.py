"""Revision: identity at zero budget, never outside the allowed region, scores equal masked forwards."""

from __future__ import annotations

import pytest
import torch
from conftest import random_model
from test_infill_support import text_model  # noqa: F401  (fixture)

from tridlm.decoding import DecodeBatch, GenerationError, GenerationParams, Row
from tridlm.decoding.revise import (
    ReviseOptions,
    ReviseRow,
    Window,
    copies_plan,
    remask_positions,
    revising_row,
    token_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]


def run(model, row):
    b = DecodeBatch(model, [row])
    with torch.inference_mode():
        while not b.done:
            b.step()
    return row


@pytest.mark.parametrize("kw", [dict(budget=0), dict(budget=0.0), dict(rounds=0, budget=5), dict(threshold=0.0),
                                dict(remask_threshold=0.0)])
def test_zero_budget_is_the_identity_without_a_forward(kw):
    model = text_model()
    text = "The cat sat on the mat."
    r = model.revise(text, **kw)
    assert r.text == text and r.changes == [] and r.metrics.forwards == 0 and r.metrics.prefill_forwards == 0
    r = model.revise(TEXT, **kw)
    assert r.ids == TEXT


def test_revision_never_touches_tokens_outside_the_allowed_region():
    model = random_model(seed=1)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    for trial in range(3):
        allowed = (torch.rand(len(TEXT), generator=g) < 0.5).tolist()
        opts = ReviseOptions(rounds=2, budget=1.0, window=4, context=2, groups=2)
        row = run(model, ReviseRow(TEXT, allowed, GenerationParams(mode="diffusion", temperature=1.0, seed=trial)
                                   .resolve(cfg), cfg, options=opts))
        assert len(row.revised) == len(TEXT)
        assert all(row.revised[i] == TEXT[i] for i in range(len(TEXT)) if not allowed[i])
        assert {c.position for c in row.changes} <= {i for i, a in enumerate(allowed) if a}
        assert any(row.revised[i] != TEXT[i] for i in range(len(TEXT)))  # it did revise, where allowed


def test_prefix_and_suffix_are_context_only_and_changes_are_reported():
    model = random_model(seed=2)
    pre, body, post = [5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]
    r = model.revise(body, prefix=pre, suffix=post, budget=3, rounds=2, temperature=1.0, seed=0)
    assert len(r.ids) == len(body)
    assert [c.position for c in r.changes] == [i for i in range(len(body)) if r.ids[i] != body[i]]
    assert all(c.old_id == body[c.position] and c.new_id == r.ids[c.position] for c in r.changes)
    assert all(len(s) <= 3 for s in r.selected) and 1 <= len(r.selected) <= 2
    assert all(0 <= p < len(body) for s in r.selected for p in s)


def test_scores_equal_one_masked_forward_per_group():
    """The side-by-side copies score each token exactly as a forward with its group masked would."""
    model = random_model(seed=3)
    mask = model.config.mask_token_id
    text = torch.tensor(TEXT)
    r0, win, ctx, groups = 2, 5, 3, 2
    windows = [Window(a, text[a:a + win + ctx], torch.arange(min(win + ctx, len(TEXT) - a)) < win)
               for a in range(r0 + 5, len(TEXT), win)]
    clean = text[r0:windows[-1].start]
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        model(text[None, :r0], torch.arange(r0)[None], cache=cache)
        plan, owners = copies_plan(windows, groups, mask, False, "cpu", clean, r0)
        logits = model(plan.tokens[None], plan.positions[None], cache=cache, pattern=plan.pattern,
                       write_cache=False, logits_at=plan.logits_at[None])[0]
        targets = torch.tensor([int(windows[w].tokens[k]) for w, k in owners])
        got = token_scores(logits, targets, mask)
        for (w, k), s in zip(owners, got.tolist(), strict=True):
            wd = windows[w]
            copy = wd.tokens.clone()
            idx = torch.arange(copy.numel())
            copy[wd.scored & (idx % groups == k % groups)] = mask
            ref = model(torch.cat([text[:wd.start], copy])[None], pattern=_prefix_block(wd.start, copy.numel()),
                        logits_at=torch.tensor([[wd.start + k]]))[0]
            assert s == pytest.approx(float(token_scores(ref, targets[:1] * 0 + int(wd.tokens[k]), mask)), abs=1e-4)


def _prefix_block(n_prefix: int, n_block: int) -> torch.Tensor:
    t = n_prefix + n_block
    m = torch.ones(t, t, dtype=torch.bool).tril()
    m[n_prefix:, n_prefix:] = True
    return m


def test_select_threshold_and_budget():
    scores = {0: 0.5, 1: 0.01, 2: 0.2, 3: 0.05, 4: 0.9}
    assert remask_positions(scores, ReviseOptions(remask_threshold=0.3), 5) == [1, 2, 3]
    assert remask_positions(scores, ReviseOptions(remask_threshold=0.3, budget=2), 5) == [1, 3]
    assert remask_positions(scores, ReviseOptions(budget=0.4), 5) == [1, 3]
    assert remask_positions(scores, ReviseOptions(), 5) == [1]  # defaults: below 0.1, at most a tenth (at least one)
    assert remask_positions(scores, ReviseOptions(), 20) == [1, 3]
    with pytest.raises(GenerationError):
        ReviseOptions(budget=-1).validate()


def test_revise_rows_batch_with_other_rows_as_if_alone():
    model = random_model(seed=4)
    cfg = model.config

    def rows():
        p = GenerationParams(mode="diffusion", temperature=1.0, seed=0).resolve(cfg)
        return [ReviseRow(TEXT, [i % 3 != 0 for i in range(len(TEXT))], p, cfg, seed=1,
                          options=ReviseOptions(rounds=2, budget=4, window=4, context=2)),
                Row([5, 6, 7], GenerationParams(mode="spec", block_length=4, max_new_tokens=12, ignore_eos=True), cfg),
                revising_row([5, 6, 7, 8], GenerationParams(mode="diffusion", block_length=4, max_new_tokens=10,
                                                            ignore_eos=True).resolve(cfg), cfg,
                             options=ReviseOptions(rounds=1, budget=2))]

    alone = [run(model, r).output for r in rows()]
    together = rows()
    b = DecodeBatch(model, together)
    with torch.inference_mode():
        while not b.done:
            b.step()
    assert [r.output for r in together] == alone


def test_revise_rounds_in_diffusion_generation():
    model = random_model(seed=5)
    kw = dict(max_new_tokens=16, block_length=4, ignore_eos=True, temperature=1.0, seed=3)
    plain = model.generate([5, 6, 7], "diffusion", **kw).ids
    assert model.generate([5, 6, 7], "diffusion", revise_rounds=0, **kw).ids == plain
    assert model.generate([5, 6, 7], "diffusion", revise_rounds=2, revise_budget=0, **kw).ids == plain
    revised = model.generate([5, 6, 7], "diffusion", revise_rounds=2, revise_budget=2, **kw)
    assert len(revised.ids) == 16 and model.config.mask_token_id not in revised.ids
    assert revised.ids != plain  # re-drawing tokens at temperature 1 changes some
    assert revised.ids[:1] == plain[:1]  # the first block's seed is AR's: never revised


def test_revise_text_round_trip_with_a_tokenizer():
    model = text_model(seed=6)
    text = "def add(a, b):\n    return a + b\n"
    r = model.revise(text, prefix="# maths\n", budget=2, rounds=1)
    assert model.tokenizer.decode(r.ids) == r.text
    assert len(r.ids) == len(model.tokenizer.encode(text))
    assert [c.position for c in r.changes] == [i for i, t in enumerate(model.tokenizer.encode(text)) if r.ids[i] != t]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_revising_diffusion_without_rounds_is_plain_diffusion(temperature):
    """So it may stand in for the diffusion mode: rows without revise settings decode exactly as before."""
    from tridlm.decoding.revise import REVISING_DIFFUSION

    model = random_model(seed=6)
    p = GenerationParams(mode="diffusion", block_length=4, max_new_tokens=14, ignore_eos=True,
                         temperature=temperature, seed=1)
    plain = run(model, Row([5, 6, 7], p, model.config)).output
    row = Row([5, 6, 7], p, model.config)
    row.mode = REVISING_DIFFUSION
    row.mode.start(row)
    assert run(model, row).output == plain


def test_min_gain_keeps_old_tokens_the_model_barely_prefers_to_replace():
    model = random_model(seed=7)
    kw = dict(budget=1.0, rounds=1, window=4, context=2)
    free = model.revise(TEXT, **kw)
    strict = model.revise(TEXT, min_gain=1e6, **kw)
    assert free.changes and strict.changes == [] and strict.ids == TEXT
    assert strict.selected == free.selected  # the same tokens were re-masked and re-denoised
    with pytest.raises(GenerationError):
        model.revise(TEXT, min_gain=0.5)


def test_revise_rounds_are_refused_outside_diffusion_and_checked_before_any_forward():
    model = random_model(seed=5)
    with pytest.raises(GenerationError, match="diffusion"):
        model.generate([5, 6, 7], "ar", revise_rounds=1, max_new_tokens=4)
    with pytest.raises(GenerationError, match="budget"):
        model.generate([5, 6, 7], "diffusion", revise_rounds=1, revise_budget=-1, max_new_tokens=4)
