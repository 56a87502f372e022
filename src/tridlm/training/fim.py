"""Training examples that teach infilling: pure functions on a batch, mixed in at configurable rates.

Two transforms, both shape-preserving, applied between the sampler and the objective:

* FIM ordering (`fim_reorder`, rate `fim_rate`): one document span of a row, cut into p | m | s, is
  rewritten as ``<fim_prefix> p <fim_suffix> s <fim_middle> m`` (PSM, as in SantaCoder/StarCoder),
  so the causal stream learns to write a middle after reading both sides; the end-of-text token that
  ends the document now follows m, which teaches where a middle stops. AR and self-speculation
  infill with this ordering (`tridlm.decoding.infill`, method "fim").
* hole noise (`hole_noise`, rate `hole_rate`): the diffusion stream's mask in every block becomes one
  contiguous run with given tokens on both sides. I.i.d. masking rarely leaves a long masked run
  followed by given tokens, yet that is exactly the block the block infiller denoises: the last given
  token, the hole's masks, then a window of the suffix.

Randomness comes from per-sample generators seeded by (seed, step, global sample index), like the
objective's noise, so a resumed or re-sharded run transforms the same samples the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..tokenizer import FimTokens
from .objective import EPS, Noise


@dataclass
class FimConfig:
    """What fraction of training rows teach infilling (0 = off: the batch is left untouched)."""

    fim_rate: float = 0.0  # rows rewritten in FIM order (needs the FIM tokens in the tokenizer)
    hole_rate: float = 0.0  # rows whose diffusion mask is one contiguous hole per block

    def __post_init__(self):
        for name in ("fim_rate", "hole_rate"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.fim_rate > 0 or self.hole_rate > 0


def sample_generator(seed: int, step: int, sample_index: int, salt: str = "fim") -> torch.Generator:
    h = hashlib.blake2b(f"{salt}:{seed}:{step}:{sample_index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=g))


# -- FIM ordering ------------------------------------------------------------------------------------------
def _documents(ids: torch.Tensor, loss_mask: torch.Tensor, eos_id: int | None) -> list[tuple[int, int, bool]]:
    """(start, end, complete) of every run of fully scored non-EOS tokens; complete = an EOS follows it."""
    L = ids.numel()
    runs, start = [], None
    for i in range(L + 1):
        inside = i < L and int(ids[i]) != eos_id and bool(loss_mask[i])
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            if i - start >= 2:
                runs.append((start, i, i < L and int(ids[i]) == eos_id))
            start = None
    return runs


def fim_reorder(ids: torch.Tensor, loss_mask: torch.Tensor, tokens: FimTokens, eos_id: int | None,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One row [L] in FIM order: a document (a complete one when the row holds any) is cut at two
    uniform points into p | m | s and rewritten as PRE p SUF s MID m; the row's last three tokens make
    room for the sentinels. Rows with no scored document of two tokens come back unchanged."""
    L = ids.numel()
    if L < 5:
        return ids, loss_mask
    body, body_mask = ids[:L - 3], loss_mask[:L - 3]
    runs = _documents(body, body_mask, eos_id)
    if not runs:
        return ids, loss_mask
    complete = [r for r in runs if r[2]]
    pool = complete or runs
    a, b, _ = pool[_randint(0, len(pool) - 1, generator)]
    i, j = sorted((_randint(a, b, generator), _randint(a, b, generator)))

    def sentinel(t: int) -> torch.Tensor:
        return torch.tensor([t], dtype=ids.dtype)

    one = torch.ones(1, dtype=loss_mask.dtype)
    new_ids = torch.cat([body[:a], sentinel(tokens.prefix), body[a:i], sentinel(tokens.suffix), body[j:b],
                         sentinel(tokens.middle), body[i:j], body[b:]])
    new_mask = torch.cat([body_mask[:a], one, body_mask[a:i], one, body_mask[j:b], one, body_mask[i:j],
                          body_mask[b:]])
    return new_ids, new_mask


# -- hole noise ----------------------------------------------------------------------------------------------
def hole_mask(length: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [length]: in each block of `block_size`, one contiguous run of 1..block_size positions."""
    out = torch.zeros(length, dtype=torch.bool)
    for start in range(0, length, block_size):
        n = min(block_size, length - start)
        k = _randint(1, n, generator)
        s = _randint(0, n - k, generator)
        out[start + s:start + s + k] = True
    return out


def hole_noise_row(loss_mask: torch.Tensor, block_size: int, generator: torch.Generator,
                   eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, u) for one row whose corruption masks exactly one hole per block (where loss_mask allows).

    u is 0 inside the holes and 1 outside, so `corrupt` masks exactly the holes whatever p; t is set
    so that p = (1 - eps) t + eps equals the masked fraction, keeping the 1/p weight of the
    objective meaningful."""
    hole = hole_mask(loss_mask.numel(), block_size, generator) & loss_mask.bool()
    u = torch.where(hole, 0.0, 1.0)
    frac = float(hole.sum()) / max(1, int(loss_mask.bool().sum()))
    t = torch.tensor(max(0.0, (frac - eps) / (1 - eps)))
    return t, u


# -- the batch hook --------------------------------------------------------------------------------------------
def transform_batch(input_ids: torch.Tensor, loss_mask: torch.Tensor, noise: Noise | None, cfg: FimConfig,
                    tokens: FimTokens | None, eos_id: int | None, block_size: int, seed: int, step: int,
                    sample_indices) -> tuple[torch.Tensor, torch.Tensor, Noise | None]:
    """Apply the configured transforms to a micro-batch (ids/loss_mask [B, L], noise from `draw_noise`).

    Each sample independently becomes a FIM-ordered row with probability fim_rate and gets hole noise
    with probability hole_rate (both may apply). Returns new tensors; the inputs are not modified.
    """
    if not cfg.enabled:
        return input_ids, loss_mask, noise
    if cfg.fim_rate > 0 and tokens is None:
        raise ValueError("fim_rate > 0 needs the FIM tokens <fim_prefix>, <fim_suffix>, <fim_middle> in the "
                         "tokenizer (tridlm.tokenizer.add_fim_tokens adds them)")
    ids, lm = input_ids.clone(), loss_mask.clone()
    ts = us = None
    if noise is not None:
        ts, us = noise.t.clone(), noise.u.clone()
    for r, idx in enumerate(sample_indices):
        g = sample_generator(seed, step, int(idx))
        draw_fim, draw_hole = torch.rand(2, generator=g).tolist()
        if draw_fim < cfg.fim_rate:
            ids[r], lm[r] = fim_reorder(ids[r].cpu(), lm[r].cpu(), tokens, eos_id, g)
        if noise is not None and draw_hole < cfg.hole_rate:
            t, u = hole_noise_row(lm[r].cpu(), block_size, g)
            ts[r], us[r] = t, u
    return ids, lm, (Noise(ts, us) if noise is not None else None)
