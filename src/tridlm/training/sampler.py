"""Deterministic sample order: global sample k of a run is row perm_e[k mod N] of epoch e = k // N.

The permutation of each epoch depends only on (seed, epoch), so the data position of a run is just
the number of samples consumed, whatever the process count, and resuming needs no iterator state.
"""

from __future__ import annotations

import torch

from .packing import PackedSplit


class SampleOrder:
    def __init__(self, split: PackedSplit, seed: int, shuffle: bool = True):
        if len(split) == 0:
            raise ValueError("the training split is empty: the corpus is shorter than one row (data.seq_len)")
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def row(self, k: int) -> int:
        n = len(self.split)
        epoch, i = divmod(k, n)
        if not self.shuffle:
            return i
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(n, generator=g)
            self._perms = {epoch: perm}  # one epoch at a time: the order only moves forward
        return int(perm[i])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, L] int64, loss_mask [B, L] int64) for global sample indices."""
        rows = [self.row(int(k)) for k in indices]
        ids = torch.from_numpy(self.split.tokens[rows].astype("int64"))
        mask = torch.from_numpy(self.split.loss_mask[rows].astype("int64"))
        return ids, mask
