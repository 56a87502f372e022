"""Block diffusion (spec §4.2): denoise a block over a read-only prefix cache, then commit it causally.

Per block of L = block_length positions:
1. the block is `[seed, MASK x (L-1)]`, the seed being the token the causal pass predicted;
2. denoise passes (pattern "block": bidirectional inside the block, the cached prefix visible,
   nothing written) sample a token for every masked position and commit some of them, chosen by
   `selection_policy` (the best one always; with the threshold policies also every one scoring
   >= `commit_threshold`; never fewer than finishing within `steps` passes needs). Commits are final;
3. once the block is full, one causal pass writes it to the cache and predicts the next seed.
The first causal pass commits the prompt's last token, so the first seed is AR-predicted exactly
as after a full causal prefill. Tokens are emitted as soon as they and everything before them are
committed; EOS among them ends the row (no commit pass follows a finished row). The block keeps
its full length near the token limit, so a shorter limit yields a prefix of a longer one's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .row import Mode, Plan, Row, span
from .sampling import PROBABILITY_POLICIES, commit_positions, greedy_confidence, sample, scores


@dataclass
class BlockState:
    block: torch.Tensor | None = None  # [L] ids, mask id where not yet committed
    emitted: int = 0  # block positions already emitted
    passes: int = 0  # denoise passes spent on this block


class Diffusion(Mode):
    name = "diffusion"

    def start(self, row: Row) -> None:
        row.state = BlockState()

    def plan_decode(self, row: Row) -> Plan:
        st: BlockState = row.state
        if st.block is None:  # commit pass over the finished block (or the prompt's last token)
            ids = torch.tensor(row.tail, device=row.device)
            return Plan(ids, span(row.cached, ids.numel(), row.device), "causal", True,
                        torch.tensor([ids.numel() - 1], device=row.device))
        masked = torch.nonzero(st.block == row.mask_id)[:, 0]
        # denoise passes are draft tokens: a LoRA drafter (tridlm.lora) acts on them, while the
        # causal commit passes -- and with them the cache and every seed -- stay the base model
        return Plan(st.block, span(row.cached, st.block.numel(), row.device), "block", False, masked, draft=True)

    def consume_decode(self, row: Row, plan: Plan, logits: torch.Tensor):
        st: BlockState = row.state
        p = row.params
        if st.block is None:  # commit pass: its last logit predicts the next seed
            seed = int(sample(logits[-1], p, row.generator, row.mask_id))
            block = torch.full((p.block_length,), row.mask_id, dtype=torch.long, device=row.device)
            block[0] = seed
            st.block, st.emitted, st.passes = block, 0, 0
        else:
            self._denoise(row, st, plan.logits_at, logits)
        self._emit_ready(row, st)
        full = not bool((st.block == row.mask_id).any())
        if full or (row.finished and st.passes):
            row.metrics.denoise_passes.append(st.passes)
        if full and not row.finished:
            row.tail, st.block = st.block.tolist(), None  # the next forward commits it
        return None

    def _denoise(self, row: Row, st: BlockState, masked: torch.Tensor, logits: torch.Tensor) -> None:
        denoise_pass(row, st.block, masked, logits, st.passes)
        st.passes += 1

    def _emit_ready(self, row: Row, st: BlockState) -> None:
        still = torch.nonzero(st.block == row.mask_id)
        ready = int(still[0, 0]) if still.numel() else st.block.numel()
        if ready > st.emitted:
            row.emit(st.block[st.emitted:ready].tolist())
            st.emitted = ready


def denoise_pass(row: Row, block: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor, passes_done: int,
                 greedy_draws: bool = False, threshold: float | None = None) -> None:
    """Commit some of the masked positions `masked` [m] of `block` in place, from their logits [m, V]
    (block logits at i predict token i), at `threshold` (default the row's commit_threshold)."""
    p = row.params
    threshold = p.commit_threshold if threshold is None else threshold
    if (greedy_draws or p.temperature == 0) and p.selection_policy in PROBABILITY_POLICIES:
        x0, score = greedy_confidence(logits, row.mask_id)  # one pass over the logits instead of four
    else:
        x0 = sample(logits, p.replace(temperature=0.0) if greedy_draws else p, row.generator, row.mask_id)
        score = scores(logits, x0, p.selection_policy, row.mask_id)
    n_min = math.ceil(masked.numel() / max(1, p.steps - passes_done))  # finish within `steps` passes
    chosen = commit_positions(score, torch.ones_like(x0, dtype=torch.bool), p.selection_policy, threshold, n_min)
    block[masked[chosen]] = x0[chosen]
