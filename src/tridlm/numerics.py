"""How far two evaluations of the same forward may differ, and what that means for greedy decoding.

The error model (README, "What is exact"). Two kernels that compute the same logits -- GEMV and
GEMM, one thread or two, AVX2 or AVX-512, a cached chunk or one pass -- sum the same products in
another order. Rounding errors of a length-K sum behave like a random walk, so with high
probability a sum is within ``lambda * sqrt(K) * u * sum|terms|`` of the exact value (Higham and
Mary's probabilistic bound; lambda = 4 leaves a failure probability of 2 exp(-8) per value for
independent roundings). Carried through ``L`` layers whose errors add as another random walk, and
with the logits' largest magnitude ``S`` standing in for the size of the sums they come from, one
evaluation's logits lie within

    E = lambda * u * sqrt(L * K) * S

of the exact ones, where u is the unit roundoff of the dtype the sums accumulate in and K the
longest reduction of the forward (hidden, intermediate or key length). bf16 and fp16 matmuls
accumulate in fp32, so their sums add fp32 error (K as above) while every stored activation is
rounded to the narrow type once per layer (K = 1 with the narrow type's u): E is the sum of both.
Two evaluations then differ by at most 2E (`agreement_tolerance`), and their greedy argmax can
differ only where the exact top-2 gap is below 2E (a *near tie*; a third evaluation measures such
a gap as at most 4E). Nothing else may change a greedy token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAMBDA = 4.0  # the probabilistic bound's confidence factor (see above)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number of `dtype`: 2^-24 for fp32, 2^-8 for bf16."""
    return torch.finfo(dtype).eps / 2


def logit_error(config, dtype: torch.dtype, scale: float, n_keys: int = 0) -> float:
    """E: the most that one evaluation of a forward's logits may lie from the exact values.

    config: the model's ModelConfig; scale: the largest |logit| (S above); n_keys: the longest
    attention key length in the forward (0 when below the hidden and intermediate sizes)."""
    depth = config.num_hidden_layers
    k = max(config.hidden_size, config.intermediate_size, n_keys)
    accumulate = unit_roundoff(torch.float32) * math.sqrt(depth * k)
    if dtype in (torch.float64, torch.float32):
        per_unit = unit_roundoff(dtype) * math.sqrt(depth * k)
    else:  # narrow storage, fp32 accumulation
        per_unit = accumulate + unit_roundoff(dtype) * math.sqrt(depth)
    return LAMBDA * per_unit * scale


def agreement_tolerance(config, dtype: torch.dtype, reference: torch.Tensor, n_keys: int = 0) -> float:
    """2E: the bound on |a - b| for two evaluations a, b of the same logits, scaled by `reference`."""
    return 2 * logit_error(config, dtype, float(reference.abs().max()), n_keys)


@dataclass(frozen=True)
class Divergence:
    """The first position where two greedy outputs differ, and whether a near tie explains it."""

    position: int  # index into the generated tokens
    gap: float  # |logit of one choice - logit of the other| at that position (inf: one output stops)
    bound: float  # the largest gap a near tie can show (4E)

    @property
    def near_tie(self) -> bool:
        return self.gap <= self.bound


def greedy_divergence(model, prompt: list[int], got: list[int], ref: list[int]) -> Divergence | None:
    """None when two greedy continuations of `prompt` are identical; else where and why they part.

    The gap is measured by a fresh full causal forward over `prompt + ref[:j]` in the model's dtype,
    i.e. a third evaluation: a difference caused by rounding shows a gap of at most 4E there."""
    if got == ref:
        return None
    j = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref)))
    ids = list(prompt) + list(ref[:j])
    if j >= min(len(got), len(ref)):  # one output is a strict prefix of the other: no rounding does that
        return Divergence(j, math.inf, 0.0)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device))[0, -1].double()
    mask_id = model.config.mask_token_id
    if mask_id is not None:
        logits[mask_id] = -math.inf
    top = float(logits.max())
    gap = top - min(float(logits[got[j]]), float(logits[ref[j]]))
    bound = 2 * agreement_tolerance(model.config, model.dtype, logits[torch.isfinite(logits)], len(ids))
    return Divergence(j, gap, bound)
