"""Autoregressive decoding (spec §4.1): one token per causal forward through the KV cache."""

from __future__ import annotations

import torch

from .row import Mode, Plan, Row, span
from .sampling import sample


class AR(Mode):
    name = "ar"

    def scratch(self, params) -> int:
        return 1

    def plan_decode(self, row: Row) -> Plan:
        ids = torch.tensor(row.tail, device=row.device)  # the last final token, not yet cached
        return Plan(ids, span(row.cached, ids.numel(), row.device), "causal", True,
                    torch.tensor([ids.numel() - 1], device=row.device))

    def consume_decode(self, row: Row, plan: Plan, logits: torch.Tensor):
        token = int(sample(logits[-1], row.params, row.generator, row.mask_id))
        row.emit([token])
        row.tail = [token]
        return None
