"""Linear self-speculation (spec §4.3): a diffusion draft of the block, then one causal verify pass.

A cycle, from the last final token `next` (not yet cached) at cache length c:
1. draft: the block `[next, MASK x (n-1)]` (n = block_length, or fewer near the token limit) is
   denoised over the read-only cache -- one pass filling every mask (`draft_threshold` 0) or
   diffusion passes committing what reaches `draft_threshold`;
2. verify: one causal pass over `[next, d_1..d_{n-1}]` writes the cache; its logit at i predicts
   token i+1. Greedy: accept the drafts while they equal the verifier's argmax, then add the
   verifier's own token (the bonus). Sampling: the speculative-sampling rule (`verify_sampled`);
3. the cache keeps `next` and the accepted drafts (c + a entries); the last emitted token is the
   next cycle's `next`.
The first cycle starts from the prompt's last token, so there is no separate seed pass.

Losslessness at temperature > 0 needs each draft drawn from a recorded distribution q that depends
only on what precedes it once accepted: true for the one-pass draft (every position sampled
independently given `next`), not for threshold passes (a later pass conditions earlier positions
on later ones). Threshold passes therefore draft greedily, i.e. with a one-hot q, which the rule
also handles exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import denoise_pass
from .row import Mode, Plan, Row, span
from .sampling import distribution, draw, greedy, verify_greedy, verify_sampled


@dataclass
class DraftState:
    block: torch.Tensor | None = None  # [n] ids: next, then drafts (mask id where not drafted yet)
    q: torch.Tensor | None = None  # [n-1, V] draft distributions, or None for deterministic drafts
    passes: int = 0


class Spec(Mode):
    name = "spec"

    def start(self, row: Row) -> None:
        row.state = DraftState()

    def plan_decode(self, row: Row) -> Plan:
        st: DraftState = row.state
        if st.block is None:
            n = max(1, min(row.params.block_length, row.remaining))
            st.block = torch.full((n,), row.mask_id, dtype=torch.long, device=row.device)
            st.block[0] = row.tail[0]
            st.q, st.passes = None, 0
        n = st.block.numel()
        masked = torch.nonzero(st.block == row.mask_id)[:, 0]
        if masked.numel():
            return Plan(st.block, span(row.cached, n, row.device), "block", False, masked, draft=True)
        return Plan(st.block, span(row.cached, n, row.device), "causal", True, span(0, n, row.device))

    def consume_decode(self, row: Row, plan: Plan, logits: torch.Tensor):
        st: DraftState = row.state
        if plan.pattern == "block":
            self._draft(row, st, plan.logits_at, logits)
            return None
        out = verify(row, logits, st.block[1:], st.q)
        row.metrics.acceptance_lengths.append(out.numel())
        row.emit(out.tolist())
        row.tail = [int(out[-1])]
        st.block = None
        return out.numel()  # keep `next` and the accepted drafts

    def _draft(self, row: Row, st: DraftState, masked: torch.Tensor, logits: torch.Tensor) -> None:
        p = row.params
        if p.draft_threshold > 0:
            denoise_pass(row, st.block, masked, logits, st.passes, greedy_draws=True, threshold=p.draft_threshold)
        elif p.temperature == 0:
            st.block[masked] = greedy(logits, row.mask_id)
        else:
            q = distribution(logits, p.temperature, p.top_k, p.top_p, row.mask_id)
            st.block[masked] = draw(q, row.generator)
            st.q = q  # one pass drafts every position 1..n-1, in order
        st.passes += 1
        if not bool((st.block == row.mask_id).any()):
            row.metrics.denoise_passes.append(st.passes)


def verify(row: Row, verify_logits: torch.Tensor, drafts: torch.Tensor,
           q: torch.Tensor | None) -> torch.Tensor:
    """Emitted tokens (accepted drafts + bonus) from causal logits [n, V] over `[next, drafts]`."""
    p = row.params
    if p.temperature == 0:
        return verify_greedy(verify_logits, drafts, row.mask_id)
    target = distribution(verify_logits, p.temperature, p.top_k, p.top_p, row.mask_id)
    return verify_sampled(target, drafts, q, row.generator)
