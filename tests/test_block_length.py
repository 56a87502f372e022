"""block_length="auto": expected tokens/s from synthetic cost and acceptance profiles whose best L is known."""

import json

import pytest
from conftest import random_model

from tridlm.decoding.block_length import (
    AcceptanceProfile,
    CostProfile,
    best_block_length,
    cached_cost_profile,
    load_acceptance_profile,
    measure_cost_profile,
    resolve_auto_block_length,
    save_acceptance_profile,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TOKENS = [1, 2, 4, 8, 16, 32, 64]


def linear_cost(fixed: float, per_token: float) -> CostProfile:
    row = [fixed + per_token * n for n in TOKENS]
    return CostProfile(TOKENS, [1], {"block": {1: row}, "causal": {1: row}})


def always(a: int, block: int = 32) -> AcceptanceProfile:
    return AcceptanceProfile.from_lengths([a] * 10, block)


def test_expected_tokens_is_truncated_mean():
    acc = AcceptanceProfile.from_lengths([1, 1, 2, 4], block_length=4)
    # P(A>=1..4) = 1, .5, .25, .25
    assert acc.expected_tokens(1) == 1.0
    assert acc.expected_tokens(2) == 1.5
    assert acc.expected_tokens(4) == 2.0 == acc.mean()
    with pytest.raises(ValueError):
        acc.expected_tokens(8)
    with pytest.raises(ValueError):
        AcceptanceProfile.from_lengths([5], block_length=4)


def test_overhead_bound_cost_and_short_acceptance_picks_the_smallest_block_covering_it():
    # cycle(L) = 2 * (10 ms + 1 ms * L); always 6 tokens accepted:
    # L=4: 4/.028 = 143/s, L=8: 6/.036 = 167/s, L=16: 6/.052 = 115/s, L=32: 6/.084 = 71/s
    best, table = best_block_length(always(6), linear_cost(0.010, 0.001))
    assert best == 8
    assert table[8] == pytest.approx(6 / 0.036)


def test_full_acceptance_picks_the_largest_block():
    assert best_block_length(always(32), linear_cost(0.010, 0.001))[0] == 32


def test_compute_bound_cost_picks_the_smallest_block():
    # cost proportional to tokens: every extra drafted token costs as much as it can ever return
    assert best_block_length(always(6), linear_cost(0.0, 0.001))[0] == 4


def test_candidates_beyond_the_observed_block_are_not_used():
    best, table = best_block_length(always(8, block=8), linear_cost(0.010, 0.001))
    assert set(table) == {4, 8} and best == 8


def test_interpolation_between_measured_token_counts():
    prof = CostProfile([1, 4, 8], [1], {"block": {1: [1.0, 4.0, 6.0]}, "causal": {1: [1.0, 4.0, 6.0]}})
    assert prof.latency("block", 6) == 5.0
    assert prof.latency("block", 16) == 10.0  # the last segment's slope continues
    assert CostProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof


def test_resolve_auto_uses_given_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path))
    model = random_model(seed=0)
    assert resolve_auto_block_length(model, always(6), linear_cost(0.010, 0.001)) == 8
    assert resolve_auto_block_length(model, always(32), linear_cost(0.010, 0.001)) == 32
    assert not list(tmp_path.rglob("*.json"))  # nothing measured, nothing cached


def test_resolve_auto_reads_the_stored_acceptance_and_caches_the_measured_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path))
    model = random_model(seed=0)
    assert load_acceptance_profile(model) is None
    save_acceptance_profile(model, always(32))
    assert load_acceptance_profile(model) == always(32)
    assert load_acceptance_profile(random_model(seed=1)) is None  # other weights, other profile
    # with full acceptance, L=32 wins unless the measured cost grows faster than linearly; compare with
    # the choice best_block_length makes on the very profile that resolve measured and cached
    L = resolve_auto_block_length(model, cost_profile=None)
    cached = list(tmp_path.rglob("cost-*.json"))
    assert len(cached) == 1
    prof = CostProfile.from_dict(json.loads(cached[0].read_text()))
    assert L == best_block_length(always(32), prof)[0]
    assert cached_cost_profile(model, tokens=(1, 4, 8, 16, 32)) == prof  # the second call reads the cache


def test_measured_profile_shape():
    model = random_model(seed=0)
    prof = measure_cost_profile(model, tokens=(1, 4), batch_sizes=(1, 2), context=8, repeats=1, warmup=0)
    assert set(prof.seconds) == {"block", "causal"}
    assert all(len(prof.seconds[p][b]) == 2 and min(prof.seconds[p][b]) > 0 for p in prof.seconds for b in (1, 2))
