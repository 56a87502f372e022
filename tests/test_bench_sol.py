"""SOL analysis (spec §4.5) on a toy denoiser whose trajectories are worked out by hand, and on a real model."""

import pytest
import torch
from conftest import random_model

from tridlm.bench.sol import (
    analyse_block,
    block_denoiser,
    dynamic_compaction,
    greedy_parallel,
    oracle_target,
    sol_on_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


V, MASK = 12, 11


def _row(token: int, peak: float) -> torch.Tensor:
    """Log-probabilities whose softmax (mask excluded) peaks at `token` with probability `peak`."""
    p = torch.full((V,), (1 - peak) / (V - 2))
    p[MASK] = 0.0
    p[token] = peak
    return p.log()


class Toy:
    """Four positions; each position's (argmax, confidence) depends on which positions are committed.

    pos0: 5 @ .90 always
    pos1: 6 @ .80 once pos0 is committed, else 1 @ .80
    pos2: 7 @ .70 always
    pos3: 9 when pos2 is committed without pos1, or pos0 is not committed; else 8.
          Confidence .95 once pos2 is committed, else .60.
    """

    def __init__(self):
        self.calls = 0

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = {i for i in range(4) if int(block[i]) != MASK}
        a1 = 6 if 0 in s else 1
        a3 = 9 if (2 in s and 1 not in s) or 0 not in s else 8
        c3 = 0.95 if 2 in s else 0.60
        return torch.stack([_row(5, 0.9), _row(a1, 0.8), _row(7, 0.7), _row(a3, c3)])


def empty_block(n=4):
    return torch.full((n,), MASK, dtype=torch.long)


def test_oracle_is_serial_confidence_order():
    # {} -> pos0 (.9); {0} -> pos1 (.8 > .7 > .6); {0,1} -> pos2 (.7 > .6); {0,1,2} -> pos3 = 8
    o = oracle_target(Toy(), empty_block(), MASK)
    assert o.target == [5, 6, 7, 8]
    assert o.order == [0, 1, 2, 3]
    assert o.passes == 4


def test_greedy_parallel_acceptance_by_hand():
    # pass 1 at {}: pos0 5 = t, pos1 1 != 6, pos2 7 = t, pos3 9 != 8          -> commit {0, 2}
    # pass 2 at {0,2}: pos1 6 = t, pos3 9 (pos2 without pos1) != 8              -> commit {1}
    # pass 3 at {0,1,2}: pos3 8 = t                                             -> commit {3}
    g = greedy_parallel(Toy(), empty_block(), [5, 6, 7, 8], MASK)
    assert g.commits == [[0, 2], [1], [3]]
    assert g.passes == 3


def test_dynamic_compaction_by_hand():
    # pass 1 at {}: matched ranked [0 (.9), 2 (.7)]. Check k=2, state {0,2}: serial picks pos3 (.95), which
    #   says 9 != 8 -> unsafe (1 check forward). Commit top-1 {0}.
    # pass 2 at {0}: matched ranked [1, 2, 3]. k=2 -> {0,1,2}: serial commits pos3 = 8, safe (1 forward);
    #   k=3 -> full block equal to t, safe with no forward. Commit {1, 2, 3}.
    toy = Toy()
    s = dynamic_compaction(toy, empty_block(), [5, 6, 7, 8], MASK)
    assert s.commits == [[0], [1, 2, 3]]
    assert s.passes == 2
    assert s.check_forwards == 2
    assert toy.calls == 4  # 2 passes + 2 check forwards
    assert not s.budget_exhausted


def test_dynamic_compaction_budget_makes_checks_conservative():
    # budget 1: the check in pass 1 spends it; in pass 2 the k=2 check cannot run -> unsafe -> commit {1};
    # pass 3 at {0,1}: matched [2 (.7), 3 (.6)], k=2 fills the block (no forward needed) -> commit {2, 3}
    s = dynamic_compaction(Toy(), empty_block(), [5, 6, 7, 8], MASK, budget=1)
    assert s.commits == [[0], [1], [2, 3]]
    assert s.check_forwards == 1 and s.budget_exhausted


def test_analyse_block_tpfs():
    r = analyse_block(Toy(), empty_block(), MASK)
    assert (r.masked, r.oracle_passes, r.greedy_passes, r.sol_passes) == (4, 4, 3, 2)
    assert r.greedy_tpf == 4 / 3 and r.sol_tpf == 2.0


def test_greedy_falls_back_to_target_at_most_confident_position():
    conf = [0.5, 0.9, 0.7]

    def never_right(block):
        return torch.stack([_row(1, c) for c in conf])

    g = greedy_parallel(never_right, empty_block(3), [2, 3, 4], MASK)
    assert g.commits == [[1], [2], [0]]


def test_prefilled_positions_are_kept_and_not_counted():
    block = empty_block()
    block[0] = 5
    r = analyse_block(Toy(), block, MASK)
    assert r.masked == 3 and r.target[0] == 5


def test_sol_on_real_model_leaves_cache_alone_and_bounds_hold():
    model = random_model(seed=5)
    ids = torch.randint(4, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        model(ids, cache=cache)
        k0 = cache.k.clone()
        r = analyse_block(block_denoiser(model, cache), empty_block(8).fill_(model.config.mask_token_id),
                          model.config.mask_token_id)
    assert torch.equal(cache.k[..., :7, :], k0[..., :7, :]) and cache.lengths.tolist() == [7]  # past 7: scratch
    assert model.config.mask_token_id not in r.target
    assert 1 <= r.sol_passes <= r.oracle_passes == 8 and 1 <= r.greedy_passes <= 8

    prompts = [ids[0].tolist(), [5, 6, 7]]
    s = sol_on_model(model, prompts, block_length=4, blocks_per_prompt=2, budget=50, seeded=False)
    assert s.blocks == 4 and s.tokens == 16 and s.oracle_passes == 16
    assert s.oracle_tpf == 1.0 and s.sol_tpf >= 1.0 and s.greedy_tpf >= 1.0
    assert s.sol_real_tpf == s.tokens / (s.sol_passes + 4)

    # seeded, as the samplers decode: [AR next token, MASK x 3]; 3 masked positions per block
    s = sol_on_model(model, prompts, block_length=4, blocks_per_prompt=2, budget=50)
    assert s.tokens == 16 and s.oracle_passes == 12 and 4 <= s.sol_passes <= 12


def test_seed_is_the_ar_next_token(monkeypatch):
    import tridlm.bench.sol as sol

    model = random_model(seed=6)
    seen = []
    real = sol.analyse_block
    monkeypatch.setattr(sol, "analyse_block", lambda d, block, *a: seen.append(block.clone()) or real(d, block, *a))
    sol.sol_on_model(model, [[5, 6, 7, 8]], block_length=4, blocks_per_prompt=1, budget=10)
    ar = model.generate([5, 6, 7, 8], mode="ar", max_new_tokens=1, ignore_eos=True).ids
    assert seen[0][0].item() == ar[0] and (seen[0][1:] == model.config.mask_token_id).all()
