"""Training transforms that teach infilling: FIM ordering and hole noise."""

from __future__ import annotations

import pytest
import torch

from tridlm.tokenizer import FimTokens
from tridlm.training.fim import (
    FimConfig,
    fim_reorder,
    hole_mask,
    hole_noise_row,
    sample_generator,
    transform_batch,
)
from tridlm.training.objective import corrupt, draw_noise

EOS = 0
TOK = FimTokens(prefix=61, suffix=62, middle=63)


def test_fim_reorder_rewrites_one_document_in_psm_order():
    doc_a, doc_b = list(range(10, 20)), list(range(30, 45))
    ids = torch.tensor(doc_a + [EOS] + doc_b + [EOS] + [50, 51, 52])
    lm = torch.ones_like(ids)
    for s in range(20):
        out, out_lm = fim_reorder(ids, lm, TOK, EOS, torch.Generator().manual_seed(s))
        assert out.shape == ids.shape and out_lm.shape == lm.shape
        seq = out.tolist()
        pre = seq.index(TOK.prefix)
        suf, mid = seq.index(TOK.suffix), seq.index(TOK.middle)
        assert pre < suf < mid
        doc = doc_a if pre == 0 else doc_b
        p, s = seq[pre + 1:suf], seq[suf + 1:mid]
        m = seq[mid + 1:mid + 1 + len(doc) - len(p) - len(s)]
        assert p + m + s == doc  # the same tokens, reordered
        assert seq[mid + 1 + len(m)] == EOS  # a complete document: its middle ends with end-of-text
        assert seq[:pre] == (ids.tolist()[:pre])  # untouched before it


def test_fim_reorder_leaves_unscored_rows_alone():
    ids = torch.arange(5, 25)
    lm = torch.zeros_like(ids)
    out, out_lm = fim_reorder(ids, lm, TOK, EOS, torch.Generator().manual_seed(0))
    assert torch.equal(out, ids) and torch.equal(out_lm, lm)


def test_hole_mask_is_one_contiguous_run_per_block():
    for s in range(30):
        m = hole_mask(37, 8, torch.Generator().manual_seed(s))
        for start in range(0, 37, 8):
            blk = m[start:start + 8].int().tolist()
            assert sum(blk) >= 1
            first = blk.index(1)
            assert blk[first:first + sum(blk)] == [1] * sum(blk)  # contiguous


def test_hole_noise_masks_exactly_the_hole_with_a_matching_weight():
    lm = torch.ones(32, dtype=torch.long)
    t, u = hole_noise_row(lm, 8, torch.Generator().manual_seed(3))
    from tridlm.training.objective import Noise

    c = corrupt(torch.arange(10, 42)[None], lm[None], Noise(t[None], u[None]), mask_token_id=3)
    assert torch.equal(c.masked[0], u == 0)
    assert float(c.p[0]) == pytest.approx(float(c.masked.float().mean()), abs=1e-6)


def test_transform_batch_rates_and_determinism():
    B, L = 64, 40
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (B, L), generator=g)
    ids[:, 19] = EOS
    lm = torch.ones_like(ids)
    before = ids.clone()
    noise = draw_noise(0, 7, range(B), L)
    same = transform_batch(ids, lm, noise, FimConfig(), TOK, EOS, 8, seed=0, step=7, sample_indices=range(B))
    assert same[0] is ids and same[2] is noise  # off: untouched
    cfg = FimConfig(fim_rate=0.5, hole_rate=0.5)
    a = transform_batch(ids, lm, noise, cfg, TOK, EOS, 8, seed=0, step=7, sample_indices=range(B))
    b = transform_batch(ids, lm, noise, cfg, TOK, EOS, 8, seed=0, step=7, sample_indices=range(B))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2].u, b[2].u)
    n_fim = int((a[0] == TOK.middle).any(1).sum())
    n_hole = int(((a[2].u == 0) | (a[2].u == 1)).all(1).sum())
    assert 16 < n_fim < 48 and 16 < n_hole < 48
    assert torch.equal(ids, before)  # inputs unchanged
    # per-sample: the same sample transforms the same way in another batch
    c = transform_batch(ids[5:6], lm[5:6], None, cfg, TOK, EOS, 8, seed=0, step=7, sample_indices=[5])
    assert torch.equal(c[0][0], a[0][5])


def test_fim_rate_needs_the_tokens():
    ids = torch.randint(5, 60, (2, 10))
    with pytest.raises(ValueError, match="FIM tokens"):
        transform_batch(ids, torch.ones_like(ids), None, FimConfig(fim_rate=0.5), None, EOS, 4, 0, 0, [0, 1])
    with pytest.raises(ValueError):
        FimConfig(fim_rate=1.5)


def test_sample_generator_depends_on_every_key():
    draws = {float(torch.rand((), generator=sample_generator(*k))) for k in [(0, 0, 0), (1, 0, 0), (0, 1, 0),
                                                                             (0, 0, 1)]}
    assert len(draws) == 4
