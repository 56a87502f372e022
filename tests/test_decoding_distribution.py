"""At temperature > 0 self-speculation samples exactly AR's distribution (the speculative-sampling rule).

On an 8-token vocabulary, thousands of rows (one batch, row i seeded with seed + i) generate three
tokens each; the joint law of the first two is compared, by a chi-square goodness-of-fit test, with
the exact AR probabilities computed from the model. A deliberately wrong acceptance rule (resampling
from p instead of the residual max(0, p - q) after a rejection) must fail the same test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_model

from tridlm.decoding import sampling, spec
from tridlm.decoding.sampling import distribution

N = 3000
PROMPT = [5, 6, 7, 4]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    m = random_model(3, vocab_size=8, hidden_size=64, eos_token_id=None)
    with torch.no_grad():  # context-sensitive, so the diffusion draft q differs clearly from p
        for layer in m.encoder.layers:
            layer.self_attn.o_proj.weight *= 4
            layer.self_attn.v_proj.weight *= 2
    return m


def exact_first_two(model, **sampling_kw) -> torch.Tensor:
    """P(t1, t2 | PROMPT) [V, V] under AR sampling, from full causal forwards."""
    V, mask = model.config.vocab_size, model.config.mask_token_id
    with torch.no_grad():
        x = torch.tensor([PROMPT])
        p1 = distribution(model(x)[0, -1], banned_id=mask, **sampling_kw).double()
        seqs = torch.cat([x.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = distribution(model(seqs)[:, -1], banned_id=mask, **sampling_kw).double()  # [t1, t2]
    return p1[:, None] * p2


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit; cells expected below 5 are pooled into one."""
    counts, probs = counts.flatten().double(), probs.flatten()
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def sampled_first_two(model, mode: str, seed: int, **kw) -> torch.Tensor:
    V = model.config.vocab_size
    out = model.generate([PROMPT] * N, mode, max_new_tokens=3, seed=seed, ignore_eos=True, **kw)
    counts = torch.zeros(V, V)
    for r in out.rows:
        counts[r.ids[0], r.ids[1]] += 1
    return counts, out


@pytest.mark.parametrize("mode,block_length", [("ar", 1), ("spec", 3), ("spec-quadratic", 3)])
def test_sampling_matches_ar_distribution(model, mode, block_length):
    counts, out = sampled_first_two(model, mode, seed=1000, block_length=block_length, temperature=1.0)
    p = chi_square_pvalue(counts, exact_first_two(model, temperature=1.0))
    assert p > 1e-3, p
    if mode != "ar":  # the test exercised both outcomes of the acceptance rule
        lengths = set(out.metrics.acceptance_lengths)
        assert 1 in lengths and max(lengths) >= 2


def test_sampling_matches_ar_with_top_k_and_top_p(model):
    kw = dict(temperature=0.8, top_k=5, top_p=0.9)
    counts, _ = sampled_first_two(model, "spec", seed=2000, block_length=3, **kw)
    assert chi_square_pvalue(counts, exact_first_two(model, **kw)) > 1e-3


def test_a_wrong_acceptance_rule_fails_the_test(model, monkeypatch):
    def wrong_rule(p, drafts, q, generator):
        """Accepts with min(1, p/q) but resamples from p itself after a rejection: biased towards q."""
        n = drafts.numel()
        if n == 0:
            return sampling.draw(p[0], generator)[None]
        idx = torch.arange(n)
        ok = sampling.uniform(n, p, generator) * q[idx, drafts] < p[idx, drafts]
        n_acc = int(torch.cumprod(ok.long(), 0).sum())
        return torch.cat([drafts[:n_acc], sampling.draw(p[n_acc], generator)[None]])

    monkeypatch.setattr(spec, "verify_sampled", wrong_rule)
    counts, _ = sampled_first_two(model, "spec", seed=1000, block_length=3, temperature=1.0)
    assert chi_square_pvalue(counts, exact_first_two(model, temperature=1.0)) < 1e-6
