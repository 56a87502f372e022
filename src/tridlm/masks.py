"""Attention patterns, as boolean matrices (True = may attend).

The model attends over `[cached prefix | new tokens]`. The prefix is always fully visible (it holds
committed tokens that precede every new token), so a pattern only says how the *new* tokens see
each other. Three patterns exist (spec §2, §3.2):

* ``causal`` -- token-causal (AR decoding, prefill, verification, the commit pass);
* ``block``  -- bidirectional within the new tokens (a diffusion block denoised over the prefix);
* ``dual``   -- the training layout ``[noisy | clean]`` of length 2L, M_BD | M_OBC | M_FC.

A caller may instead pass an explicit ``[T, T]`` or ``[B, T, T]`` boolean tensor (used by
quadratic self-speculation, whose groups need a pattern of their own).
"""

from __future__ import annotations

import torch

PATTERNS = ("causal", "block", "dual")


def causal_mask(n: int, device=None) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def block_mask(n: int, device=None) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device)


def dual_stream_mask(half_len: int, block_size: int, device=None) -> torch.Tensor:
    """The NLD training mask over `[noisy (L) | clean (L)]`, shape [2L, 2L].

    noisy->noisy: same block, both ways (M_BD); noisy->clean: strictly earlier blocks (M_OBC);
    clean->clean: token-causal (M_FC); clean never sees noisy. L need not divide by block_size.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = half_len
    idx = torch.arange(2 * n, device=device)
    q, kv = idx[:, None], idx[None, :]
    noisy_q, noisy_kv = q < n, kv < n
    blk_q, blk_kv = (q % n) // block_size, (kv % n) // block_size
    m_bd = noisy_q & noisy_kv & (blk_q == blk_kv)
    m_obc = noisy_q & ~noisy_kv & (blk_q > blk_kv)
    m_fc = ~noisy_q & ~noisy_kv & (q >= kv)
    return m_bd | m_obc | m_fc


def new_token_mask(pattern, n: int, block_size: int | None = None, device=None) -> torch.Tensor:
    """The [n, n] (or [B, n, n] when given so) mask among the new tokens for a pattern."""
    if isinstance(pattern, torch.Tensor):
        if pattern.dtype != torch.bool or pattern.shape[-2:] != (n, n):
            raise ValueError(f"an explicit pattern must be a bool tensor ending in ({n}, {n}), got "
                             f"{tuple(pattern.shape)} {pattern.dtype}")
        return pattern.to(device)
    if pattern == "causal":
        return causal_mask(n, device)
    if pattern == "block":
        return block_mask(n, device)
    if pattern == "dual":
        if n % 2:
            raise ValueError(f"the dual pattern needs an even input length [noisy | clean], got {n}")
        if block_size is None:
            raise ValueError("the dual pattern needs block_size")
        return dual_stream_mask(n // 2, block_size, device)
    raise ValueError(f"unknown attention pattern {pattern!r}; use one of {PATTERNS} or a bool tensor")


def full_mask(new_mask: torch.Tensor, prefix_lens: torch.Tensor, new_offsets: torch.Tensor, key_len: int,
              new_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Expand a new-token mask to the key space `[B, 1, T, key_len]`.

    Row b's prefix occupies key slots [0, prefix_lens[b]); its new tokens sit at slots
    new_offsets[b] + t. Slots that are neither (stale cache, other rows' padding) are hidden.
    `new_valid[b, t]` False marks padding among the new tokens: no one attends to it, and a padded
    query attends only to itself so that softmax stays finite.
    """
    B = prefix_lens.shape[0]
    T = new_mask.shape[-1]
    dev = new_mask.device
    j = torch.arange(key_len, device=dev)[None, :]  # [1, S]
    is_prefix = j < prefix_lens[:, None]  # [B, S]
    rel = j - new_offsets[:, None]  # [B, S]
    is_new = (rel >= 0) & (rel < T)
    rel_c = rel.clamp(0, T - 1)
    nm = new_mask if new_mask.dim() == 3 else new_mask.expand(B, T, T)
    # allowed_new[b, t, s] = nm[b, t, rel_c[b, s]]
    allowed_new = torch.gather(nm, 2, rel_c[:, None, :].expand(B, T, key_len))
    if new_valid is not None:
        key_valid = torch.gather(new_valid, 1, rel_c)  # [B, S]
        allowed_new = allowed_new & key_valid[:, None, :]
    allowed = is_prefix[:, None, :] | (is_new[:, None, :] & allowed_new)
    if new_valid is not None:
        self_slot = (rel[:, None, :] == torch.arange(T, device=dev)[None, :, None])  # [B, T, S]
        pad_q = ~new_valid[:, :, None]
        allowed = torch.where(pad_q, self_slot, allowed)
    return allowed[:, None]
