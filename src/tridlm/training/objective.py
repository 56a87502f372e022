"""The joint AR + block-diffusion objective (spec §3.1-3.3).

One forward over the dual-stream input ``[noisy | clean]`` (length 2L, positions ``arange(L)`` for
both halves) gives diffusion logits on the noisy half (position i predicts token i) and causal
logits on the clean half (position i predicts token i+1). Corruption is absorbing: each scorable
position is replaced by the mask token with probability ``p = (1 - eps) * t + eps``, one
``t ~ U(0, 1)`` per sequence.

The functions here return *sums* and *counts*, never means: the trainer divides by the number of
contributing tokens of the whole global batch (spec §3.1 "global loss averaging").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-3


@dataclass
class Noise:
    """Per-sequence noise level t [B] and per-position uniforms u [B, L]: masked where u < p."""

    t: torch.Tensor
    u: torch.Tensor


def noise_seed(seed: int, step: int, sample_index: int) -> int:
    """A 63-bit generator seed from (run seed, optimizer step, global sample index)."""
    h = hashlib.blake2b(f"{seed}:{step}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def draw_noise(seed: int, step: int, sample_indices, seq_len: int) -> Noise:
    """Noise for a batch, drawn per sample so it depends only on (seed, step, global index).

    Every rank therefore draws different noise for its own samples, and a run gives the same noise
    whatever its process count or accumulation split.
    """
    ts, us = [], []
    for idx in sample_indices:
        g = torch.Generator().manual_seed(noise_seed(seed, step, int(idx)))
        ts.append(torch.rand((), generator=g))
        us.append(torch.rand(seq_len, generator=g))
    return Noise(torch.stack(ts), torch.stack(us))


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return (1 - eps) * t + eps


def corrupt(input_ids: torch.Tensor, loss_mask: torch.Tensor, noise: Noise, mask_token_id: int,
            eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy ids, masked [B, L] bool, p [B]). Positions with loss_mask 0 are never masked."""
    p = mask_probability(noise.t, eps).to(input_ids.device)
    masked = (noise.u.to(input_ids.device) < p[:, None]) & loss_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked, p


@dataclass
class LossSums:
    """Summed losses and their token counts for one micro-batch (or, after adding, a global batch)."""

    ar_sum: torch.Tensor
    diff_sum: torch.Tensor
    n_ar: int
    n_masked: int

    def total(self, alpha: float) -> torch.Tensor:
        """The numerator of the objective: sum AR CE + alpha * sum (masked CE / p)."""
        return self.ar_sum + alpha * self.diff_sum if alpha else self.ar_sum


def contributing_tokens(loss_mask: torch.Tensor, masked: torch.Tensor | None) -> int:
    """AR-scored tokens (targets 1..L-1 with loss_mask) plus masked tokens: the normaliser's share."""
    n = int(loss_mask[:, 1:].sum())
    return n + (int(masked.sum()) if masked is not None else 0)


def joint_loss_sums(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, noise: Noise | None,
                    mask_token_id: int, block_size: int, eps: float = EPS) -> LossSums:
    """Forward once and return the summed AR and (1/p-weighted) diffusion cross-entropies.

    With ``noise=None`` (the AR-only stage, alpha = 0) only the clean stream is run, causally: its
    logits equal the clean half of the dual forward, since clean tokens never attend to noisy ones.
    """
    B, L = input_ids.shape
    ar_scored = loss_mask[:, 1:].bool()
    if noise is None:
        ar_logits = model(input_ids, torch.arange(L, device=input_ids.device).expand(B, L), pattern="causal",
                          write_cache=False)
        diff_sum, n_masked = ar_logits.new_zeros(()).float(), 0
    else:
        noisy, masked, p = corrupt(input_ids, loss_mask, noise, mask_token_id, eps)
        positions = torch.arange(L, device=input_ids.device).repeat(2).expand(B, 2 * L)
        logits = model(torch.cat([noisy, input_ids], dim=1), positions, pattern="dual", block_size=block_size)
        diff_logits, ar_logits = logits[:, :L], logits[:, L:]
        ce = F.cross_entropy(diff_logits[masked].float(), input_ids[masked], reduction="none")
        weight = (1.0 / p)[:, None].expand(B, L)[masked]
        diff_sum, n_masked = (ce * weight).sum(), int(masked.sum())
    ar_ce = F.cross_entropy(ar_logits[:, :-1][ar_scored].float(), input_ids[:, 1:][ar_scored], reduction="sum")
    return LossSums(ar_ce, diff_sum, int(ar_scored.sum()), n_masked)
