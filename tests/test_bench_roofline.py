"""Roofline byte counting: weights read once per AR step, KV read at the current context."""

import pytest
from conftest import random_model

from tridlm.bench.roofline import copy_bandwidth, kv_bytes_per_token, roofline, weight_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")


def test_untied_embedding_counts_one_row():
    m = random_model(seed=0)  # vocab 64, hidden 32, fp32, untied
    c = m.config
    every = sum(p.numel() for p in m.parameters()) * 4
    assert weight_bytes_per_token(m) == every - 64 * 32 * 4 + 32 * 4
    assert c.num_parameters() * 4 == every


def test_tied_embedding_is_read_whole_by_the_head():
    m = random_model(seed=0, tie_word_embeddings=True)
    assert weight_bytes_per_token(m) == m.config.num_parameters() * 4


def test_kv_bytes_and_fraction():
    m = random_model(seed=0)  # 2 layers, 2 kv heads, head_dim 8
    assert kv_bytes_per_token(m, context=10) == 2 * 2 * 2 * 8 * 10 * 4
    r = roofline(m, tokens_per_second=100.0, context=10, copy_bytes_per_s=1e9)
    assert r.achieved_bytes_per_s == pytest.approx((r.weight_bytes + r.kv_bytes) * 100)
    assert r.fraction == pytest.approx(r.achieved_bytes_per_s / 1e9)
    assert r.ceiling_tokens_per_second == pytest.approx(1e9 / (r.weight_bytes + r.kv_bytes))


def test_copy_bandwidth_is_positive():
    assert copy_bandwidth(nbytes=1 << 20, repeats=2) > 0
