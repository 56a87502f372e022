"""A preallocated per-layer KV cache whose rows may hold different lengths.

Row b's valid entries are slots [0, lengths[b]). A forward either *writes* its new keys/values at
slots lengths[b] + t and advances lengths, or only *reads* the cache (a diffusion block attends to
the prefix without storing itself). `crop` shortens rows (rejected drafts); slots past a row's
length are garbage and never attended to.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device=None):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        c = model.config
        p = next(model.parameters())
        return cls(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, max_len,
                   dtype=p.dtype, device=p.device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def uniform_length(self) -> int | None:
        """The common length when every row has the same one, else None (enables fast paths)."""
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        return lo if lo == hi else None

    def check_room(self, n_new: int) -> None:
        need = int(self.lengths.max()) + n_new
        if need > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} positions; this forward needs {need}")

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, uniform: int | None) -> None:
        """Store [B, H, T, D] at slots lengths[b] + t (lengths are advanced by `advance`)."""
        T = k_new.shape[2]
        if uniform is not None:
            self.k[layer, :, :, uniform:uniform + T] = k_new
            self.v[layer, :, :, uniform:uniform + T] = v_new
            return
        if self._native_write(k_new, v_new):  # rows at different lengths in one call, not index tensors a layer
            torch.ops.tridlm.kv_write(self.k[layer], self.v[layer], self.lengths, k_new, v_new)
            return
        slots = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None, :]  # [B, T]
        b = torch.arange(self.batch_size, device=slots.device)[:, None].expand_as(slots)
        # advanced indexing puts the indexed dims first: [B, T, H, D]
        self.k[layer][b, :, slots] = k_new.transpose(1, 2)
        self.v[layer][b, :, slots] = v_new.transpose(1, 2)

    def _native_write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
        """Whether tridlm.native's kv_write takes this write: its kernels are loaded (the op exists), on the CPU,
        new entries of the cache's dtype with contiguous rows, no gradient to track, not inside a compiled graph."""
        return (self.k.device.type == "cpu" and k_new.dtype == v_new.dtype == self.k.dtype
                and k_new.stride(-1) == 1 and v_new.stride(-1) == 1 and not (k_new.requires_grad or v_new.requires_grad)
                and not torch.compiler.is_compiling() and hasattr(torch.ops.tridlm, "kv_write"))

    def write_layers(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store every layer's [L, B, H, T, D] at slots lengths[b] + t: one copy per tensor when the rows
        share a length."""
        uniform = self.uniform_length()
        if uniform is None:
            for layer in range(k_new.shape[0]):
                self.write(layer, k_new[layer], v_new[layer], None)
            return
        T = k_new.shape[3]
        self.k[:, :, :, uniform:uniform + T] = k_new
        self.v[:, :, :, uniform:uniform + T] = v_new

    def advance(self, n_new: torch.Tensor | int) -> None:
        self.lengths += n_new

    def crop(self, new_lengths: torch.Tensor | int) -> None:
        """Shorten rows to `new_lengths` (never lengthen)."""
        new = torch.as_tensor(new_lengths, device=self.lengths.device).expand_as(self.lengths)
        if bool((new > self.lengths).any()) or bool((new < 0).any()):
            raise ValueError(f"crop can only shorten rows: lengths {self.lengths.tolist()} -> {new.tolist()}")
        self.lengths.copy_(new)  # in place: a view's (`rows`) crop lands in the cache it views

    def keep(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Compact row `row`: move entries at `slots` to [start, start+len(slots)) and set its length.

        Used when a forward wrote more entries than survive (quadratic self-speculation keeps one
        token per draft group).
        """
        n = slots.numel()
        self.k[:, row, :, start:start + n] = self.k[:, row, :, slots].clone()
        self.v[:, row, :, start:start + n] = self.v[:, row, :, slots].clone()
        self.lengths[row] = start + n

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own over this one's storage: what a forward writes through
        it, and the lengths it advances, land in this cache."""
        c = object.__new__(KVCache)
        c.k, c.v, c.lengths, c.max_len = self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop], \
            self.max_len
        return c

    def clone(self) -> KVCache:
        c = object.__new__(KVCache)
        c.k, c.v, c.lengths, c.max_len = self.k.clone(), self.v.clone(), self.lengths.clone(), self.max_len
        return c
