"""How fast can batch-1 decoding read weights on this machine? Matrix-vector products (what AR decoding
at batch 1 is made of) against plain memory reads, in GB/s of weights read.

    python scripts/gemv_bandwidth.py --threads 2

Rows: one large matrix (the best case for the BLAS), SmolLM2-135M's own projection shapes (30 layers x
q, k, v, o, gate, up, down, as `F.linear` calls in the order a forward makes them), the same layers
with q/k/v and gate/up fused into one matrix each, and a read-only reduction over the same bytes.
Data are random (never zeros), every figure is a median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemv_rate(shapes, dtype, repeats: int) -> float:
    mats = [torch.randn(o, i, dtype=dtype) for o, i in shapes]
    xs = {i: torch.randn(1, i, dtype=dtype) for _, i in shapes}
    t = timed(lambda: [F.linear(xs[m.shape[1]], m) for m in mats], repeats)
    return sum(m.numel() * m.element_size() for m in mats) / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7)
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
    data = torch.randn(64 << 20)
    t = timed(lambda: data.sum(), args.repeats)
    print(f"| read-only reduction over 256 MiB (fp32) | {data.numel() * 4 / t / 1e9:.1f} | |")


if __name__ == "__main__":
    main()
