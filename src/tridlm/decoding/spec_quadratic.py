"""Quadratic self-speculation (spec §4.4, TiDAR-style): one forward per cycle verifies the previous
draft and drafts the next block for every possible acceptance point.

With L = block_length, the cycle's input is n groups (n = 1 + number of drafts, at most L):
group j = `[b_j, MASK x L]`, where b_0 = next (the last final token) and b_j = draft j. Inside
the forward (an explicit attention pattern):
* b_j sees the cached prefix and b_0..b_j: the b's form one causal chain, so b_j's logit is the
  verifier's prediction of token j+1 and b_j's keys/values are exactly a causal pass's;
* group j's masks see the cached prefix, b_0..b_j and each other: a diffusion block conditioned on
  "drafts 1..j accepted". Its masks sit at positions c+j+1 .. c+j+L; the first covers the bonus
  position (the verifier decides that token), the other L-1 draft the next cycle.
After the forward the row keeps only b_0..b_{a-1} (a = tokens emitted) in the cache, compacted, and
the next drafts come from group a-1. A cycle costs one forward; the first cycle (no draft yet) emits
the verifier's single token and the first draft. Verification, greedy or sampled, is the linear
mode's, so the output is AR's at temperature 0 and AR-distributed above it. With block_length 1
there is nothing to draft and a cycle is a plain AR step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .row import Mode, Plan, Row
from .sampling import distribution, draw, greedy
from .spec import verify

# cycles of more tokens than this read their logits on demand: below it the head's extra rows cost less than
# reading its weights twice more (the default model, 2 Xeon cores: two block-2 rows beside 22 AR and 8
# diffusion rows, a step of 95-99 ms lazily against 82-95; one row alone, the same speed either way)
LAZY_LOGITS_ABOVE = 32


@dataclass
class QuadState:
    drafts: torch.Tensor | None = None  # [n-1] drafted tokens following row.tail[0]
    q: torch.Tensor | None = None  # [n-1, V] their distributions (sampled drafts only)


def layout(n: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For n groups of 1 + m tokens: (group of each token [T], offset within its group [T], mask [T, T])."""
    idx = torch.arange(n * (m + 1), device=device)
    group, off = idx // (m + 1), idx % (m + 1)
    is_b = off == 0
    q_group, k_group = group[:, None], group[None, :]
    sees_b = is_b[None, :] & (k_group <= q_group)  # the causal chain of b's, up to the own group
    same_group_masks = ~is_b[None, :] & ~is_b[:, None] & (k_group == q_group)
    return group, off, sees_b | same_group_masks


class SpecQuadratic(Mode):
    name = "spec-quadratic"

    def start(self, row: Row) -> None:
        row.state = QuadState()

    def scratch(self, params) -> int:
        L = params.block_length
        return L * (L + 1) + 1

    @staticmethod
    def masks_per_group(row: Row) -> int:
        return row.params.block_length if row.params.block_length > 1 else 0

    def plan_decode(self, row: Row) -> Plan:
        st: QuadState = row.state
        m = self.masks_per_group(row)
        head = torch.tensor(row.tail, device=row.device)
        b = head if st.drafts is None else torch.cat([head, st.drafts])
        n = b.numel()
        group, off, mask = layout(n, m, row.device)
        tokens = torch.where(off == 0, b[group], torch.full_like(group, row.mask_id))
        positions = row.cached + group + off
        # a LoRA drafter acts on the masks, never on the verified chain; of the T = n (L + 1) logits,
        # consume reads the n of the chain and the L - 1 of one group. Wide cycles run the head on those
        # alone (lazy: two products of a few rows); narrow ones take all T in the forward's own head
        # product, shared with every row beside them -- each lazy product reads the head's weights again
        lazy = tokens.numel() > LAZY_LOGITS_ABOVE
        return Plan(tokens, positions, mask, True, torch.arange(tokens.numel(), device=row.device),
                    draft=off > 0, lazy_logits=lazy)

    def consume_decode(self, row: Row, plan: Plan, logits: torch.Tensor):
        st: QuadState = row.state
        m = self.masks_per_group(row)
        n = plan.size // (m + 1)
        firsts = torch.arange(n, device=row.device) * (m + 1)
        drafts = st.drafts if st.drafts is not None else firsts[:0]
        out = verify(row, logits[firsts], drafts, st.q)
        a = out.numel()
        row.metrics.acceptance_lengths.append(a)
        row.emit(out.tolist())
        row.tail = [int(out[-1])]
        # next drafts: group a-1's masks after the bonus position
        k = min(m - 1, max(0, row.remaining - 1))
        start = int(firsts[a - 1]) + 2
        st.drafts, st.q = self._draft(row, logits[start:start + k]) if k else (None, None)
        return firsts[:a]  # keep b_0..b_{a-1}

    def _draft(self, row: Row, draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [k] and their distributions [k, V] (None when greedy) from block logits [k, V]."""
        p = row.params
        if p.temperature == 0:
            return greedy(draft_logits, row.mask_id), None
        q = distribution(draft_logits, p.temperature, p.top_k, p.top_p, row.mask_id)
        return draw(q, row.generator), q
