"""Memory-bandwidth roofline of AR decoding, reported the way gpt-fast does.

At batch 1 an AR step reads every weight once plus the whole KV cache, so

    achieved bandwidth = (weight bytes + KV bytes read) per token x tokens/s

and it is compared with the machine's copy bandwidth, measured here with a large tensor copy
(bytes read + bytes written, the STREAM "copy" convention). A fraction near 1 means decoding is
memory-bound and as fast as this memory allows; far below 1 means time goes elsewhere (compute,
framework overhead) -- see the profile in BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


def _unique_params(model):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one AR step reads. An untied embedding table is gathered one row per token;
    a tied one is read whole by the output head."""
    emb = model.encoder.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in _unique_params(model))
    if emb is not model.diffusion_head.weight:
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def kv_bytes_per_token(model, context: float) -> float:
    """Bytes of cached keys and values one AR step reads at `context` cached positions."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * model.dtype.itemsize


@torch.no_grad()
def copy_bandwidth(device="cpu", nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes/s of a large device-memory copy, counting read + write."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first copy pays for page faults
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


@dataclass
class Roofline:
    tokens_per_second: float
    context: float  # mean cached positions while decoding
    weight_bytes: int
    kv_bytes: float
    achieved_bytes_per_s: float
    copy_bytes_per_s: float

    @property
    def fraction(self) -> float:
        return self.achieved_bytes_per_s / self.copy_bytes_per_s

    @property
    def ceiling_tokens_per_second(self) -> float:
        """AR tokens/s if every step ran at the copy bandwidth."""
        return self.copy_bytes_per_s / (self.weight_bytes + self.kv_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(fraction=self.fraction, ceiling_tokens_per_second=self.ceiling_tokens_per_second)
        return d


def roofline(model, tokens_per_second: float, context: float, copy_bytes_per_s: float) -> Roofline:
    w, kv = weight_bytes_per_token(model), kv_bytes_per_token(model, context)
    return Roofline(tokens_per_second, context, w, kv, (w + kv) * tokens_per_second, copy_bytes_per_s)
