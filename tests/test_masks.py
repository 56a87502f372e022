"""Each attention pattern equals a matrix built by hand, element by element, from its definition."""

import torch

from tridlm.masks import block_mask, causal_mask, dual_stream_mask, full_mask, new_token_mask


def reference_dual(L: int, bs: int) -> torch.Tensor:
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_noisy, k_noisy = q < L, k < L
            qb, kb = (q % L) // bs, (k % L) // bs
            if q_noisy and k_noisy:
                m[q, k] = qb == kb  # own block, both directions
            elif q_noisy and not k_noisy:
                m[q, k] = kb < qb  # clean copies of strictly earlier blocks
            elif not q_noisy and not k_noisy:
                m[q, k] = k <= q  # clean stream is token-causal
            # clean never attends to noisy: stays False
    return m


def test_causal_and_block_masks():
    n = 5
    ref = torch.tensor([[k <= q for k in range(n)] for q in range(n)])
    assert torch.equal(causal_mask(n), ref)
    assert torch.equal(block_mask(n), torch.ones(n, n, dtype=torch.bool))
    assert torch.equal(new_token_mask("causal", n), ref)


def test_dual_stream_mask_L10_block4_by_hand():
    m = dual_stream_mask(10, 4)
    assert torch.equal(m, reference_dual(10, 4))
    # spot checks that spell out the definition on the ragged last block (positions 8, 9)
    assert m[8, 9] and m[9, 8]  # same (short) noisy block, both ways
    assert not m[8, 7]  # noisy block 2 does not see noisy block 1
    assert m[8, 10 + 7] and not m[8, 10 + 8]  # sees clean tokens of earlier blocks only
    assert not m[10 + 5, 5]  # clean never sees noisy
    assert m[10 + 5, 10 + 5] and not m[10 + 5, 10 + 6]


def test_dual_stream_mask_other_sizes():
    for L, bs in [(1, 1), (7, 3), (8, 8), (6, 1), (5, 32)]:
        assert torch.equal(dual_stream_mask(L, bs), reference_dual(L, bs)), (L, bs)
    assert torch.equal(new_token_mask("dual", 20, block_size=4), reference_dual(10, 4))


def test_full_mask_prefix_and_padding():
    # row 0: prefix 3, new tokens at slots 3..5 ; row 1: prefix 1, new tokens at slots 1..3, last is padding
    nm = causal_mask(3)
    prefix = torch.tensor([3, 1])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    m = full_mask(nm, prefix, prefix, key_len=6, new_valid=valid)[:, 0]
    ref = torch.zeros(2, 3, 6, dtype=torch.bool)
    for b, p in enumerate([3, 1]):
        for t in range(3):
            for s in range(6):
                if not valid[b, t]:
                    ref[b, t, s] = s == p + t  # padding sees only itself
                elif s < p:
                    ref[b, t, s] = True
                elif p <= s < p + 3:
                    ref[b, t, s] = (s - p) <= t and bool(valid[b, s - p])
    assert torch.equal(m, ref)
