"""The joint objective against a hand computation (spec §3.1-3.3), and the trainer's global normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from tridlm import ModelConfig, TriModeLM
from tridlm.training.objective import (
    EPS,
    Corruption,
    Noise,
    contributing_tokens,
    corrupt,
    draw_noise,
    joint_loss_sums,
    mask_probability,
)

MASK = 3
BLOCK = 4


def _model(seed=0) -> TriModeLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, mask_token_id=MASK, block_size=BLOCK, max_position_embeddings=64)
    return TriModeLM(cfg).eval()


def _log_softmax_at(logits_row: torch.Tensor, target: int) -> float:
    z = logits_row.double()
    return float(z[target] - torch.logsumexp(z, dim=0))


def _hand_loss(model, ids, loss_mask, masked, p, alpha):
    """The formula, term by term, with logits from separate forwards (not the dual one)."""
    B, L = ids.shape
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    with torch.no_grad():
        causal = model(ids, torch.arange(L).expand(B, L), pattern="causal", write_cache=False)
        # the noisy half, by the mask's definition: same block both ways, earlier blocks of the clean stream
        logits_dual = model(torch.cat([noisy, ids], 1), torch.arange(L).repeat(2).expand(B, 2 * L),
                            pattern=_hand_dual_mask(L, BLOCK))
    ar_sum, n_ar, diff_sum, n_masked = 0.0, 0, 0.0, 0
    for b in range(B):
        for i in range(L - 1):
            if loss_mask[b, i + 1]:
                ar_sum -= _log_softmax_at(causal[b, i], int(ids[b, i + 1]))
                n_ar += 1
        for i in range(L):
            if masked[b, i]:
                diff_sum -= _log_softmax_at(logits_dual[b, i], int(ids[b, i])) / float(p[b])
                n_masked += 1
    return ar_sum, diff_sum, n_ar, n_masked, (ar_sum + alpha * diff_sum) / (n_ar + n_masked)


def _hand_dual_mask(n: int, bs: int) -> torch.Tensor:
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            if q < n and k < n:
                m[q, k] = q // bs == k // bs
            elif q < n <= k:
                m[q, k] = q // bs > (k - n) // bs
            elif q >= n and k >= n:
                m[q, k] = q >= k
    return m


def _fixed_batch():
    ids = torch.tensor([[5, 9, 11, 7, 20, 21, 8, 30, 12, 6],
                        [13, 14, 15, 16, 17, 18, 19, 22, 23, 24]])
    masked = torch.tensor([[0, 1, 0, 0, 1, 1, 0, 0, 0, 1],
                           [1, 0, 0, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    p = torch.tensor([0.4, 0.25])
    return ids, masked, p


def test_loss_matches_hand_computation():
    model = _model()
    ids, masked, p = _fixed_batch()
    loss_mask = torch.ones_like(ids)
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    with torch.no_grad():
        s = joint_loss_sums(model, ids, loss_mask, Corruption(noisy, masked, p), BLOCK)
    ar, diff, n_ar, n_masked, total = _hand_loss(model, ids, loss_mask, masked, p, alpha=0.3)
    assert (s.n_ar, s.n_masked) == (n_ar, n_masked) == (18, 8)
    assert float(s.ar_sum) == pytest.approx(ar, rel=1e-5)
    assert float(s.diff_sum) == pytest.approx(diff, rel=1e-5)
    count = contributing_tokens(loss_mask, Corruption(noisy, masked, p))
    assert count == 26
    assert float(s.total(0.3)) / count == pytest.approx(total, rel=1e-5)


def test_sft_loss_mask_prompt_never_masked_nor_scored():
    model = _model()
    ids, _, _ = _fixed_batch()
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
                              [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]])
    # every uniform below p: all scorable positions would be masked, prompt ones must not be
    noise = Noise(t=torch.tensor([0.5, 0.5]), u=torch.zeros(2, 10))
    c = corrupt(ids, loss_mask, noise, MASK)
    assert torch.equal(c.masked, loss_mask.bool())
    assert torch.equal(c.noisy[loss_mask == 0], ids[loss_mask == 0])
    with torch.no_grad():
        s = joint_loss_sums(model, ids, loss_mask, c, BLOCK)
    ar, diff, n_ar, n_masked, _ = _hand_loss(model, ids, loss_mask, c.masked, c.p, alpha=0.3)
    assert (s.n_ar, s.n_masked) == (n_ar, n_masked) == (12, 12)  # AR targets are positions 1..L-1 with mask 1
    assert float(s.ar_sum) == pytest.approx(ar, rel=1e-5)
    assert float(s.diff_sum) == pytest.approx(diff, rel=1e-5)


def test_mask_probability_and_noise_are_keyed_by_seed_step_and_sample():
    assert float(mask_probability(torch.tensor(0.0))) == pytest.approx(EPS)
    assert float(mask_probability(torch.tensor(1.0))) == pytest.approx(1.0)
    a = draw_noise(0, 5, [10, 11, 12], 16)
    b = draw_noise(0, 5, [12], 16)  # the same sample in another batch composition
    assert torch.equal(a.u[2], b.u[0]) and torch.equal(a.t[2], b.t[0])
    assert not torch.equal(draw_noise(0, 6, [12], 16).u, b.u)  # another step
    assert not torch.equal(draw_noise(1, 5, [12], 16).u, b.u)  # another seed
    assert not torch.equal(a.t[0], a.t[1])  # one t per sequence


def test_ar_only_stage_equals_the_clean_half_of_the_dual_forward():
    model = _model()
    ids, masked, p = _fixed_batch()
    lm = torch.ones_like(ids)
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    with torch.no_grad():
        dual = joint_loss_sums(model, ids, lm, Corruption(noisy, masked, p), BLOCK)
        ar_only = joint_loss_sums(model, ids, lm, None, BLOCK)
    assert float(ar_only.ar_sum) == pytest.approx(float(dual.ar_sum), rel=1e-5)
    assert ar_only.n_masked == 0 and float(ar_only.total(0.0)) == float(ar_only.ar_sum)
    assert contributing_tokens(lm, None) == 18


def test_loss_at_init_is_near_log_vocab():
    model = _model()
    ids = torch.randint(4, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    lm = torch.ones_like(ids)
    with torch.no_grad():
        s = joint_loss_sums(model, ids, lm, corrupt(ids, lm, draw_noise(0, 0, range(4), 16), MASK), BLOCK)
    assert abs(float(s.ar_sum) / s.n_ar - math.log(40)) < 0.5
