"""Which weight path a forward takes, chosen by measuring it on this machine.

int8 and int4 weight-only products (weight formats "int8", "int4") read a half or a quarter of the
bytes of bf16 ones, which wins while a forward is memory-bound (a few tokens: decoding steps, verify
and draft blocks); past some width torch's bf16 GEMM wins (a prefill: on a 2-core AMD EPYC a 128-token
prefill takes 134 ms through int8 kernels, 84 ms through bf16 ones). `quant_max_tokens` is the widest
forward (batch x tokens) for which the format measured faster, found once on the model's own fused
projections (well under a second) and kept under `tridlm.machine.cache_root()/kernels/` keyed by
format, CPU, ISA, threads, torch and the model's shapes. The bf16 weights stay the parameters, so both
paths are always there. `native_max_tokens` is found the same way for tridlm's own products
(tridlm.native) against torch's in the same format: bf16 weights, or int8; and
`native_attention_max_tokens` for tridlm's attention over a KV cache against torch's.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .machine import cache_root, cpu_isa, cpu_name
from .native import source_hash

WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128)  # forward widths (batch x tokens) measured
LAYERS_TIMED = 4  # layers whose products are timed: enough for a stable ratio, fast enough to be unseen


def cache_file(model, fmt: str) -> Path:
    shapes = {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "vocab_size")}
    text = json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "device": str(model.device), "shapes": shapes,
                       "drafter": model.draft_adapter is not None,
                       "source": source_hash() if fmt.startswith("native") else None}, sort_keys=True)
    return cache_root() / "kernels" / f"{fmt}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


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
                   native: bool | str = False) -> dict[int, tuple[float, float]]:
    """{width: (seconds through `fmt` products, seconds through bf16 ones)} for the base products of a
    few layers (q/k/v, o, gate/up, down) at that many tokens. native: (tridlm.native's products, torch's)
    in `fmt` ("float": bf16 weights), through the model's native_kernel or the one `native` names."""
    quant = fmt if fmt in ("int8", "int4") else None
    mine = native if isinstance(native, str) else model.native_kernel if quant is None else True
    paths = ((quant, mine), (quant, False)) if native else ((quant, False), (None, False))
    return time_paths(model, paths, widths, repeats)


def time_paths(model, paths, widths=WIDTHS, repeats: int = 5) -> dict[int, tuple[float, ...]]:
    """{width: seconds per path} for the base products of LAYERS_TIMED layers at that many tokens, each path
    a (quant, native) pair as FusedProjections takes them."""
    groups = []
    for layer in model.encoder.layers[:LAYERS_TIMED]:
        groups += [layer.self_attn.qkv, layer.self_attn.out, layer.mlp.gate_up, layer.mlp.down]
    out = {}
    with torch.no_grad():
        for g in groups:
            for quant, native in paths:
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


def _cached(path: Path, read, measure, refresh: bool):
    """A measurement kept in `path`: read(its JSON) gives the value and raises on anything unusable (another
    version's file); otherwise, or with refresh, measure() gives (value, the JSON to keep)."""
    if path.exists() and not refresh:
        try:
            return read(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, IndexError):
            pass  # unreadable or from another version: measure again
    value, data = measure()
    _store(path, data)
    return value


def _measured_range(model, key: str, measure, refresh: bool) -> int:
    def measured():
        timings = measure()
        best = _widest_win(timings)
        return best, {"max_tokens": best,
                      "ms": {w: [round(a * 1e3, 3), round(b * 1e3, 3)] for w, (a, b) in timings.items()}}

    return _cached(cache_file(model, key), lambda data: int(data["max_tokens"]), measured, refresh)


def _store(path: Path, data: dict) -> None:
    """Write a measurement's JSON whole or not at all (a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def quant_max_tokens(model, fmt: str, refresh: bool = False) -> int:
    """The widest forward (batch x tokens) to run through `fmt` products on this machine: 0 when they
    never win, the widest width measured when they always do. Cached per machine."""
    return _measured_range(model, fmt, lambda: measure_widths(model, fmt), refresh)


def native_max_tokens(model, fmt: str, refresh: bool = False) -> int:
    """The widest forward to run through tridlm.native's products in `fmt` ("float": bf16 weights, or
    "int8") rather than torch's, on this machine. Cached per machine like quant_max_tokens."""
    key = f"native-{fmt}" + (f"-{model.native_kernel}" if fmt == "float" else "")
    return _measured_range(model, key, lambda: measure_widths(model, fmt, native=True), refresh)


NATIVE_KERNEL_WIDTHS = (1, 8, 32)  # a decoding step, a draft or verify block, a batch of them


def native_kernel(model, refresh: bool = False) -> str:
    """Which of tridlm's bf16 products the model's narrow forwards take on this machine: "amx" where the AMX
    one runs, fits every fused group and took less time summed over NATIVE_KERNEL_WIDTHS than the AVX-512
    one on the model's own products, else "native". Cached per machine like quant_max_tokens."""
    from . import native

    groups = model._fused_groups()
    fits = all(native.amx_fits(w.shape[1]) for g in groups for w in g.float_weights())
    if native.amx_unavailable() or not fits:
        return "native"

    def read(data):
        if data["kernel"] not in ("native", "amx"):
            raise ValueError(data["kernel"])
        return data["kernel"]

    def measured():
        timings = time_paths(model, ((None, "amx"), (None, "native")), NATIVE_KERNEL_WIDTHS)
        amx_s, avx512_s = (sum(t[i] for t in timings.values()) for i in range(2))
        kernel = "amx" if amx_s < avx512_s else "native"
        return kernel, {"kernel": kernel, "ms": {"amx": round(amx_s * 1e3, 3), "native": round(avx512_s * 1e3, 3)}}

    return _cached(cache_file(model, "native-kernel"), read, measured, refresh)


NORM_WIDTHS = (1, 128)  # a decoding step's rows, a wide step's or a prefill chunk's


def _own_if_faster(model, name: str, own, torchs, inputs, refresh: bool) -> bool:
    """Whether tridlm's kernel `own` replaces torch's `torchs` (the same result) on this machine: it took less
    time at every one of NORM_WIDTHS, each width's arguments made by `inputs(width)`. Cached per machine
    under `name` like the other choices."""
    def measured():
        ms = {}
        with torch.inference_mode():
            for width in NORM_WIDTHS:
                args = inputs(width)
                ms[width] = [round(median_seconds(partial(f, *args), 50) * 1e3, 4) for f in (own, torchs)]
        on = all(mine < theirs for mine, theirs in ms.values())
        return on, {"native": on, "ms": ms}

    return _cached(cache_file(model, name), lambda data: bool(data["native"]), measured, refresh)


def _native_here(model) -> bool:
    from .native import unavailable

    return not unavailable() and model.dtype == torch.bfloat16 and model.device.type == "cpu"


def native_norm(model, refresh: bool = False) -> bool:
    """Whether the model's RMSNorms take tridlm's one-pass kernel (tridlm.native's rms_norm_bf16) on this
    machine: where it runs and took less time than torch's formula at every one of NORM_WIDTHS rows."""
    if not _native_here(model):
        return False
    norm = model.encoder.norm
    return _own_if_faster(model, "native-norm", lambda x: torch.ops.tridlm.rms_norm_bf16(x, norm.weight, norm.eps),
                          norm.torch_forward,
                          lambda rows: (torch.randn(rows, model.config.hidden_size, dtype=torch.bfloat16),),
                          refresh)


def native_rope(model, refresh: bool = False) -> bool:
    """Whether the model's attention rotates queries and keys with tridlm's one-call kernel (tridlm.native's
    rope_bf16, the same bits as torch's formula): where it runs and took less time than the formula at
    every one of NORM_WIDTHS tokens."""
    c = model.config
    if not _native_here(model) or c.head_dim % 32:
        return False

    def inputs(tokens):
        qk = torch.randn(tokens, 1, c.num_attention_heads + c.num_key_value_heads, c.head_dim,
                         dtype=torch.bfloat16).transpose(1, 2)
        q, k = qk.split([c.num_attention_heads, c.num_key_value_heads], dim=1)
        return (q, k, *(torch.randn(tokens, 1, 1, c.head_dim, dtype=torch.bfloat16) for _ in range(2)))

    rotate = model.encoder.layers[0].self_attn.torch_rotate
    return _own_if_faster(model, "native-rope", torch.ops.tridlm.rope_bf16, rotate, inputs, refresh)


def measure_attention(model, widths=WIDTHS, repeats: int = 5, context: int = 192) -> dict[int, tuple[float, float]]:
    """{width: (seconds through tridlm.native's attention, through torch's)} for one layer's attention of
    that many new tokens over a cache holding `context` entries, as an eager forward runs it."""
    from .native import unavailable

    if unavailable():
        raise RuntimeError(f"tridlm's attention cannot run here: {unavailable()}")
    c = model.config
    gen = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        for w in widths:
            cache = model.new_cache(1, context + w)
            cache.k.normal_(generator=gen)
            cache.v.normal_(generator=gen)
            cache.lengths.fill_(context)
            q = torch.randn(1, c.num_attention_heads, w, c.head_dim, generator=gen).to(model.dtype)
            k, v = (torch.randn(1, c.num_key_value_heads, w, c.head_dim, generator=gen).to(model.dtype)
                    for _ in range(2))
            ctx = model._attention_context(1, w, "causal", None, cache, False, None, model.device)

            def torch_attention(ctx=ctx, q=q, k=k, v=v):
                keys, values = ctx.keys_values(0, k, v)
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, enable_gqa=True)

            out[w] = (median_seconds(lambda ctx=ctx, q=q, k=k, v=v: ctx.attend_native(0, q, k, v), repeats),
                      median_seconds(torch_attention, repeats))
    return out


def native_attention_max_tokens(model, refresh: bool = False) -> int:
    """The widest forward over a KV cache to run through tridlm.native's attention rather than torch's on
    this machine. Cached per machine like quant_max_tokens."""
    return _measured_range(model, "native-attention", lambda: measure_attention(model), refresh)


# the widest row count checked; wider products are split into pieces this wide. Where torch's first kernel
# regime ends on an Intel Xeon (bf16): checked up to 64, random data passed a width that real rows did not
INVARIANT_WIDEST = 32
INVARIANT_VALUES = 1 << 18  # outputs compared at each row count: a changed sum order shows in few of them
INVARIANT_DRAWS = 16  # ... in at most this many products


def invariant_rows(n_out: int, n_in: int, dtype: torch.dtype, device, widest: int = INVARIANT_WIDEST) -> int:
    """The largest w <= `widest` such that torch's products x @ W.T of every row count 1..w gave each row
    the bits it gets alone, for an [n_out, n_in] weight on this machine. A GEMM library picks its kernel
    and blocking by shape, so one row's sum order can change with the rows beside it (on an Intel Xeon in
    bf16, past 32 rows for most of SmolLM2's shapes); splitting wider products into w-row pieces keeps each
    row's result its solo one. Random values, as the choice depends on the shape; a changed order moves
    only a few outputs across a rounding boundary, so each row count compares INVARIANT_VALUES of them."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype=dtype, device=device)
    with torch.no_grad():
        for m in range(1, widest + 1):
            for _ in range(min(INVARIANT_DRAWS, -(-INVARIANT_VALUES // (m * n_out)))):
                x = torch.randn(m, n_in, generator=gen).to(dtype=dtype, device=device)
                solo = torch.cat([F.linear(x[i:i + 1], w) for i in range(m)])
                if not torch.equal(F.linear(x, w), solo):
                    return m - 1
    return widest


INVARIANT_KERNELS = ("torch", "native", "amx")  # torch's in row pieces; tridlm's AVX-512 and AMX products


def invariant_choice(weight: torch.Tensor, native_fits: bool, rows: int = 4 * INVARIANT_WIDEST) -> tuple[int, str]:
    """(row pieces, kernel) for batch-invariant products with `weight` [N, K] on this machine. Candidates:
    torch's products in pieces of invariant_rows; and, where the packed layout fits, tridlm's AVX-512 and AMX
    products (csrc/small_gemm.cpp, csrc/amx_gemm.cpp), which sum every output in one order at every width.
    Each is timed alone (1 row: a solo decoding step) and on `rows` rows (a loaded server's forward); the one
    whose two times, each over the fastest at that width, have the least product wins, so solo latency and
    throughput under load count alike."""
    from . import fusion, native

    n, k = weight.shape
    chunk = invariant_rows(n, k, weight.dtype, weight.device)
    products = {"torch": lambda x: torch.cat([F.linear(x[i:i + chunk], weight) for i in range(0, len(x), chunk)])}
    if native_fits:
        packed = native.pack(weight)
        products["native"] = lambda x: fusion.OWN_PRODUCTS["native"](x, packed)
        if native.amx_fits(k) and not native.amx_unavailable():
            products["amx"] = lambda x: fusion.OWN_PRODUCTS["amx"](x, packed)
    if len(products) == 1:
        return chunk, "torch"
    times = {name: [] for name in products}
    with torch.no_grad():
        for m in (1, rows):
            x = torch.randn(m, k).to(weight.dtype)
            for name, product in products.items():
                times[name].append(median_seconds(lambda p=product, x=x: p(x), 5))
    fastest = [min(t[i] for t in times.values()) for i in range(2)]
    return chunk, min(times, key=lambda name: times[name][0] / fastest[0] * times[name][1] / fastest[1])


def invariant_choices(model, refresh: bool = False) -> dict[tuple[int, int, bool], tuple[int, str]]:
    """{(N, K, whether tridlm's products fit the group): invariant_choice} for every weight the model's
    batch-invariant products read (FusedProjections.float_weights, groups marked invariant). About 10 s for
    the default model on 2 cores; cached per machine like quant_max_tokens, and with tridlm's kernels'
    source, on which the choice depends."""

    def read(data):
        if data["widest"] != INVARIANT_WIDEST or any(c[4] not in INVARIANT_KERNELS for c in data["choices"]):
            raise ValueError("measured for another version")
        return {(n, k, fits): (chunk, kernel) for n, k, fits, chunk, kernel in data["choices"]}

    def measured():
        choices = {}
        for g in model._fused_groups():
            fits = g.native_fits()
            for w in g.float_weights():
                key = (*w.shape, fits)
                if key not in choices:
                    choices[key] = invariant_choice(w.detach(), fits)
        return choices, {"widest": INVARIANT_WIDEST, "choices": [[*key, *choice] for key, choice in choices.items()]}

    return _cached(cache_file(model, "native-invariant"), read, measured, refresh)
