"""tridlm's own CPU kernels alone, at the shapes the default model's forwards give them: the attention
(`attend_bf16`: SmolLM2's 9 query heads over 3 key/value heads of 64, a decoding step's rows or a diffusion
block's, over caches of a few lengths) and the AMX product (the 30 layers' q/k/v, o, gate/up and down
weights, each its own memory, at several row counts; then the same with a rank-32 LoRA drafter's delta on the
last rows, `gemm_bf16_amx_drafted`). Medians of repeats, one process.

    python scripts/kernel_micro.py --threads 2 --json out.json

Run it with PYTHONPATH set to another checkout's src to time that checkout's kernels on the same shapes.
"""

from __future__ import annotations

import argparse
import sys

ATTENTION = ((1, 1, 40), (24, 1, 40), (8, 8, 40), (1, 1, 500), (24, 1, 200), (8, 8, 200))  # rows, new tokens, cache
PRODUCT_ROWS = (1, 8, 24, 40, 88, 120)
# rows, of which drafts (the last ones): one token; one diffusion block; 32 AR rows and one block; 24 AR rows and 8
DRAFTED = ((1, 1), (8, 8), (40, 8), (88, 64))
RANK = 32  # the default model's drafter


def median_us(f, repeats: int) -> float:
    """Median microseconds of f() after a few untimed calls (tridlm.kernels.median_seconds after one)."""
    from tridlm.kernels import median_seconds

    for _ in range(max(2, repeats // 10)):
        f()
    return median_seconds(f, repeats) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from tridlm import native
    from tridlm.bench.report import record
    from tridlm.machine import cpu_name

    if native.unavailable():
        print(f"tridlm.native unavailable here: {native.unavailable()}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "attention_us": {}, "products_ms": {}}
    H, Hkv, D = 9, 3, 64
    for B, T, n in ATTENTION:  # q and the new keys/values as a forward's transposed views
        q = torch.randn(B, T, H, D).bfloat16().transpose(1, 2)
        k_cache, v_cache = (torch.randn(B, Hkv, n + 64, D).bfloat16() for _ in range(2))
        k_new, v_new = (torch.randn(B, T, Hkv, D).bfloat16().transpose(1, 2) for _ in range(2))
        lengths, mask = torch.full((B,), n), torch.ones(B, T, T, dtype=torch.bool)
        call = (q, k_cache, v_cache, lengths, k_new, v_new, mask, D ** -0.5)
        out["attention_us"][f"{B} rows x {T} tokens, cache {n}"] = median_us(
            lambda call=call: torch.ops.tridlm.attend_bf16(*call), 300)
    if native.amx_unavailable() is None:
        hidden, ffn, kv = 576, 1536, 192
        shapes = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn)]  # outputs, inputs
        layers = [[native.pack(torch.randn(n, k).bfloat16()) for n, k in shapes] for _ in range(30)]
        for rows in PRODUCT_ROWS:
            xs = {k: torch.randn(rows, k).bfloat16() for k in (hidden, ffn)}

            def products(xs=xs):
                for ws in layers:
                    for (_, k), w in zip(shapes, ws, strict=True):
                        torch.ops.tridlm.gemm_bf16_amx(xs[k], w)

            out["products_ms"][f"{rows} rows"] = median_us(products, 11) / 1e3
        # the same layers' base outputs with a LoRA drafter's delta on the draft rows (gemm_bf16_amx_drafted)
        drafted = [[(native.pack(torch.randn(n + RANK, k).bfloat16()), native.pack(torch.randn(n, RANK).bfloat16()))
                    for n, k in shapes] for _ in range(30)]
        out["drafted_products_ms"] = {}
        for rows, drafts in DRAFTED:
            xs = {k: torch.randn(rows, k).bfloat16() for k in (hidden, ffn)}
            gate = torch.ones(drafts)

            def products(xs=xs, gate=gate, rows=rows, drafts=drafts):
                for ws in drafted:
                    for (n, k), (w, b) in zip(shapes, ws, strict=True):
                        torch.ops.tridlm.gemm_bf16_amx_drafted(xs[k], w, n, b, gate, rows - drafts, rows, 2.0)

            out["drafted_products_ms"][f"{rows} rows, {drafts} drafts"] = median_us(products, 11) / 1e3
    record(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
