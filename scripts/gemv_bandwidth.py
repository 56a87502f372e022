"""How fast can batch-1 decoding read weights on this machine? Matrix-vector products (what AR decoding
at batch 1 is made of) against plain memory reads, in GB/s of weights read.

    python scripts/gemv_bandwidth.py --threads 2 [--compiled]

Rows: one large matrix (the best case for the BLAS), SmolLM2-135M's own projection shapes (30 layers x
q, k, v, o, gate, up, down, as `F.linear` calls in the order a forward makes them), the same layers
with q/k/v and gate/up fused into one matrix each (also as int8 weight-only products with bf16
activations, as `--dtype int8` runs them), the fused layers through tridlm's own products
(tridlm.native, at 1 and 8 tokens), and a read-only reduction over the same bytes. --compiled
adds the fused layers as one Inductor graph (max-autotune, frozen weights; tens of seconds to compile
per dtype). Data are random (never zeros), every figure is a median of repeats; GB/s counts the bytes
of the weights in the format read.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tridlm.kernels import median_seconds as timed

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30


def gemv_rate(shapes, dtype, repeats: int) -> float:
    mats = [torch.randn(o, i, dtype=dtype) for o, i in shapes]
    xs = {i: torch.randn(1, i, dtype=dtype) for _, i in shapes}
    t = timed(lambda: [F.linear(xs[m.shape[1]], m) for m in mats], repeats)
    return sum(m.numel() * m.element_size() for m in mats) / t / 1e9


def int8_rate(shapes, repeats: int) -> float:
    mats = []
    for o, i in shapes:
        w = torch.randn(o, i)
        scales = w.abs().amax(1) / 127
        mats.append(((w / scales[:, None]).round().to(torch.int8), scales.to(torch.bfloat16)))
    xs = {i: torch.randn(1, i, dtype=torch.bfloat16) for _, i in shapes}
    t = timed(lambda: [torch.ops.aten._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in mats], repeats)
    return sum(q.numel() for q, _ in mats) / t / 1e9


def compiled_rate(shapes, dtype, repeats: int) -> tuple[float, float]:
    """(GB/s, compile seconds) of the layers as one graph with frozen weights; each output feeds the next
    product's input so that the graph is one chain, as in a forward."""
    import torch._inductor.config as inductor_config

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mats = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(o, i, dtype=dtype), requires_grad=False)
                                               for o, i in shapes)

        def forward(self, x):
            for m in self.mats:  # the input of each product: the previous output, cut or tiled to size
                n = m.shape[1]
                x = F.linear(x.repeat(1, -(-n // x.shape[-1]))[..., :n], m)
            return x

    inductor_config.freezing = True
    chain = Chain().eval()
    x = torch.randn(1, shapes[0][1], dtype=dtype)
    with torch.no_grad():
        t0 = time.perf_counter()
        fn = torch.compile(chain, mode="max-autotune-no-cudagraphs", fullgraph=True)
        fn(x)
        compile_s = time.perf_counter() - t0
        t = timed(lambda: fn(x), repeats)
    return sum(o * i * torch.finfo(dtype).bits // 8 for o, i in shapes) / t / 1e9, compile_s


def native_rate(shapes, repeats: int, tokens: int = 1, int8: bool = False) -> float:
    """tridlm's own products (tridlm.native) on the same shapes, at `tokens` rows of x."""
    from tridlm import native

    mats = []
    for o, i in shapes:
        w = torch.randn(o, i)
        if int8:
            scales = w.abs().amax(1) / 127
            mats.append((native.pack((w / scales[:, None]).round().to(torch.int8)), scales, i))
        else:
            mats.append((native.pack(w.bfloat16()), None, i))
    xs = {i: torch.randn(tokens, i, dtype=torch.bfloat16) for _, i in shapes}
    if int8:
        t = timed(lambda: [torch.ops.tridlm.gemm_int8(xs[i], p, s) for p, s, i in mats], repeats)
    else:
        t = timed(lambda: [torch.ops.tridlm.gemm_bf16(xs[i], p) for p, _, i in mats], repeats)
    return sum(p.numel() * p.element_size() for p, _, _ in mats) / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compiled", action="store_true", help="also the fused layers as one Inductor graph (slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layer = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
             (HIDDEN, INTER)]
    fused = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GB/s of weights read, median of "
          f"{args.repeats}")
    print("| case | fp32 | bf16 |\n|---|---:|---:|")
    for name, shapes in (("one 16384 x 4096 matrix", [(16384, 4096)]),
                         ("SmolLM2 layers, 7 projections each", layer * LAYERS),
                         ("SmolLM2 layers, qkv and gate/up fused", fused * LAYERS)):
        rates = [gemv_rate(shapes, dt, args.repeats) for dt in (torch.float32, torch.bfloat16)]
        print(f"| {name} | {rates[0]:.1f} | {rates[1]:.1f} |")
    print(f"| SmolLM2 layers, fused, int8 weight-only (bf16 activations; GB/s of int8 bytes) | | "
          f"{int8_rate(fused * LAYERS, args.repeats):.1f} |")
    from tridlm import native

    if native.unavailable():
        print(f"| tridlm's own products: unavailable ({native.unavailable()}) | | |")
    else:
        for tokens in (1, 8):
            print(f"| SmolLM2 layers, fused, tridlm's own products, {tokens} token{'s' * (tokens > 1)} | | "
                  f"{native_rate(fused * LAYERS, args.repeats, tokens):.1f} |")
        print(f"| the same, int8 codes (GB/s of int8 bytes), 1 token | | "
              f"{native_rate(fused * LAYERS, args.repeats, 1, int8=True):.1f} |")
    if args.compiled:
        got = [compiled_rate(fused * LAYERS, dt, args.repeats) for dt in (torch.float32, torch.bfloat16)]
        print(f"| SmolLM2 layers, fused, Inductor max-autotune + freezing (compile s: {got[0][1]:.0f} / "
              f"{got[1][1]:.0f}) | {got[0][0]:.1f} | {got[1][0]:.1f} |")
    data = torch.randn(64 << 20)
    t = timed(lambda: data.sum(), args.repeats)
    print(f"| read-only reduction over 256 MiB (fp32) | {data.numel() * 4 / t / 1e9:.1f} | |")


if __name__ == "__main__":
    main()
