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


@dataclass
class Corruption:
    """The noisy stream of a batch: ids with masks, which positions are masked, and each row's p."""

    noisy: torch.Tensor
    masked: torch.Tensor
    p: torch.Tensor


def corrupt(input_ids: torch.Tensor, loss_mask: torch.Tensor, noise: Noise, mask_token_id: int,
            eps: float = EPS) -> Corruption:
    """Absorbing-state masking with probability p per position; loss_mask 0 positions are never masked."""
    p = mask_probability(noise.t, eps).to(input_ids.device)
    masked = (noise.u.to(input_ids.device) < p[:, None]) & loss_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return Corruption(noisy, masked, p)


@dataclass
class LossSums:
    """Summed losses and their token counts for one micro-batch."""

    ar_sum: torch.Tensor
    diff_sum: torch.Tensor  # sum over masked tokens of CE / p (the objective's diffusion term)
    n_ar: int
    n_masked: int
    diff_ce_sum: float = 0.0  # the same CE unweighted, for reporting only
    distill_sum: torch.Tensor | None = None  # sum over masked tokens of KL(causal teacher || diffusion)

    def total(self, alpha: float, distill: float = 0.0) -> torch.Tensor:
        """The numerator of the objective: sum of AR CE + alpha * sum of (masked CE / p)
        (+ distill * the self-distillation sum, when that term is on)."""
        out = self.ar_sum + alpha * self.diff_sum if alpha else self.ar_sum
        if distill and self.distill_sum is not None:
            out = out + distill * self.distill_sum
        return out


def contributing_tokens(loss_mask: torch.Tensor, corruption: Corruption | None) -> int:
    """The normaliser's share of a micro-batch: AR-scored targets (positions 1..L-1 with loss_mask)
    plus masked positions. Known before the forward, so the global count can be all-reduced first."""
    n = int(loss_mask[:, 1:].sum())
    return n + (int(corruption.masked.sum()) if corruption is not None else 0)


def joint_loss_sums(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, corruption: Corruption | None,
                    block_size: int, distill: float = 0.0) -> LossSums:
    """Forward once and return the summed AR and (1/p-weighted) diffusion cross-entropies.

    AR: causal logit i scores token i+1 where loss_mask[i+1]. Diffusion: noisy logit i scores token i
    where it was masked, weighted by 1/p of its row. With ``corruption=None`` (the AR-only stage)
    only the clean stream is run, causally: its logits equal the clean half of the dual forward,
    since clean tokens never attend to noisy ones.
    """
    B, L = input_ids.shape
    dev = input_ids.device
    ar_scored = loss_mask[:, 1:].bool()
    if corruption is None:
        ar_logits = model(input_ids, torch.arange(L, device=dev).expand(B, L), pattern="causal", write_cache=False)
        diff_sum, n_masked, diff_ce_sum = torch.zeros((), device=dev), 0, 0.0
    else:
        masked = corruption.masked
        positions = torch.arange(L, device=dev).repeat(2).expand(B, 2 * L)
        logits = model(torch.cat([corruption.noisy, input_ids], dim=1), positions, pattern="dual",
                       block_size=block_size)
        diff_logits, ar_logits = logits[:, :L], logits[:, L:]
        ce = F.cross_entropy(diff_logits[masked].float(), input_ids[masked], reduction="none")
        weight = (1.0 / corruption.p)[:, None].expand(B, L)[masked]
        diff_sum, n_masked, diff_ce_sum = (ce * weight).sum(), int(masked.sum()), float(ce.detach().sum())
    ar_ce = F.cross_entropy(ar_logits[:, :-1][ar_scored].float(), input_ids[:, 1:][ar_scored], reduction="sum")
    sums = LossSums(ar_ce, diff_sum, int(ar_scored.sum()), n_masked, diff_ce_sum)
    if distill and corruption is not None:
        sums.distill_sum = self_distillation_sum(diff_logits, ar_logits, corruption.masked)
    return sums


def self_distillation_sum(diff_logits: torch.Tensor, ar_logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions i >= 1 of KL(teacher || student), where the teacher is the causal
    prediction of token i (clean-stream logit i-1, detached) and the student the diffusion logit i.

    Self-speculation accepts a draft exactly when it equals the verifier's (causal) choice, so this
    pulls the drafter toward the verifier rather than toward the data."""
    target = masked.clone()
    target[:, 0] = False  # no causal prediction exists for the first token
    teacher = torch.cat([ar_logits[:, :1], ar_logits[:, :-1]], dim=1)[target].detach().float()
    student = diff_logits[target].float()
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum")
