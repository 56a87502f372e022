"""Which weight path a forward takes, chosen by measuring it on this machine.

int8 and int4 weight-only products (weight formats "int8", "int4") read a half or a quarter of the
bytes of bf16 ones, which wins while a forward is memory-bound (a few tokens: decoding steps, verify
and draft blocks); past some width torch's bf16 GEMM wins (a prefill: on a 2-core AMD EPYC a 128-token
prefill takes 134 ms through int8 kernels, 84 ms through bf16 ones). `quant_max_tokens` is the widest
forward (batch x tokens) for which the format measured faster, found once on the model's own fused
projections (well under a second) and kept under `tridlm.machine.cache_root()/kernels/` keyed by
format, CPU, ISA, threads, torch and the model's shapes. The bf16 weights stay the parameters, so both
paths are always there. `native_max_tokens` is found the same way for tridlm's own products
(tridlm.native) against torch's in the same format: bf16 weights, or int8.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from .machine import cache_root, cpu_isa, cpu_name

WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128)  # forward widths (batch x tokens) measured
LAYERS_TIMED = 4  # layers whose products are timed: enough for a stable ratio, fast enough to be unseen


def cache_file(model, fmt: str) -> Path:
    shapes = {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "vocab_size")}
    text = json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "device": str(model.device), "shapes": shapes,
                       "drafter": model.draft_adapter is not None,
                       "source": _native_source() if fmt.startswith("native") else None}, sort_keys=True)
    return cache_root() / "kernels" / f"{fmt}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


def _native_source() -> str:
    from .native import SOURCE

    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_widths(model, fmt: str, widths=WIDTHS, repeats: int = 5,
                   native: bool = False) -> dict[int, tuple[float, float]]:
    """{width: (seconds through `fmt` products, seconds through bf16 ones)} for the base products of a
    few layers (q/k/v, o, gate/up, down) at that many tokens. native: (tridlm.native's products, torch's)
    in `fmt` ("float": bf16 weights)."""
    groups = []
    for layer in model.encoder.layers[:LAYERS_TIMED]:
        groups += [layer.self_attn.qkv, layer.self_attn.out, layer.mlp.gate_up, layer.mlp.down]
    quant = fmt if fmt in ("int8", "int4") else None
    paths = ((quant, True), (quant, False)) if native else ((quant, False), (None, False))
    out = {}
    with torch.no_grad():
        for g in groups:
            g.prepare(quant, native)
        for w in widths:
            xs = [torch.randn(1, w, g.members()[0].weight.shape[1], dtype=model.dtype, device=model.device)
                  for g in groups]
            def products(path, xs=xs):
                return [g(x, *path) for g, x in zip(groups, xs, strict=True)]

            out[w] = tuple(median_seconds(lambda p=p: products(p), repeats) for p in paths)
    return out


def _widest_win(timings: dict[int, tuple[float, float]]) -> int:
    best = 0
    for w in sorted(timings):  # the first width at which the other path wins ends the range
        if timings[w][0] > timings[w][1]:
            break
        best = w
    return best


def _measured_range(model, key: str, measure, refresh: bool) -> int:
    path = cache_file(model, key)
    if path.exists() and not refresh:
        try:
            return int(json.loads(path.read_text())["max_tokens"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or from another version: measure again
    timings = measure()
    best = _widest_win(timings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"max_tokens": best, "ms": {w: [round(a * 1e3, 3), round(b * 1e3, 3)]
                                                               for w, (a, b) in timings.items()}}, indent=1))
    tmp.replace(path)
    return best


def quant_max_tokens(model, fmt: str, refresh: bool = False) -> int:
    """The widest forward (batch x tokens) to run through `fmt` products on this machine: 0 when they
    never win, the widest width measured when they always do. Cached per machine."""
    return _measured_range(model, fmt, lambda: measure_widths(model, fmt), refresh)


def native_max_tokens(model, fmt: str, refresh: bool = False) -> int:
    """The widest forward to run through tridlm.native's products in `fmt` ("float": bf16 weights, or
    "int8") rather than torch's, on this machine. Cached per machine like quant_max_tokens."""
    return _measured_range(model, f"native-{fmt}", lambda: measure_widths(model, fmt, native=True), refresh)
