"""Load benchmark of `tridlm serve`: throughput and p50/p95 latency by mode and concurrency.

    python scripts/load_bench.py --model out/tiny                 # starts a server in-process on 127.0.0.1
    python scripts/load_bench.py --tiny                           # trains the test suite's tiny model first
    python scripts/load_bench.py --url http://127.0.0.1:8000      # a running server

C clients (asyncio, one connection each) send completions back to back, each a fixed length
(ignore_eos) so that every mode makes the same tokens; a level ends after `--requests` requests
(default 2 x C, at least 8). Levels run mode after mode within each concurrency, and the whole sweep
`--rounds` times, so drift in the machine's load spreads over every mode alike. Reported per (mode, C):
the median over rounds of requests/s and generated tokens/s (over each level's wall time), p50/p95
request latency over all rounds' requests, and the mean tokens per forward the server reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

import httpx

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n", "KING HENRY:\n",
           "To be, or not to be", "Once upon a time", "My lord, ", "O, what a noble mind", "Friends, Romans,"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def level(url: str, key: str | None, mode: str, concurrency: int, requests: int, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    latencies, tokens, tpf, chosen = [], 0, [], {}
    counter = iter(range(requests))

    async def client(c: httpx.AsyncClient):
        nonlocal tokens
        for i in counter:
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json={**body, "prompt": PROMPTS[i % len(PROMPTS)], "mode": mode})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            u = r.json()["usage"]
            tokens += u["completion_tokens"]
            chosen[u["mode"]] = chosen.get(u["mode"], 0) + 1
            if u["tokens_per_forward"]:
                tpf.append(u["tokens_per_forward"])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"mode": mode, "concurrency": concurrency, "requests": requests, "wall_s": wall,
            "requests_per_s": requests / wall, "tokens_per_s": tokens / wall, "latencies": latencies,
            "tpf": tpf, "chosen": chosen}


def summarize(runs: list[dict]) -> dict:
    """One (mode, C) over its rounds."""
    lat = [x for r in runs for x in r["latencies"]]
    tpf = [x for r in runs for x in r["tpf"]]
    chosen: dict[str, int] = {}
    for r in runs:
        for k, v in r["chosen"].items():
            chosen[k] = chosen.get(k, 0) + v
    return {"mode": runs[0]["mode"], "concurrency": runs[0]["concurrency"], "rounds": len(runs),
            "requests": sum(r["requests"] for r in runs),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95),
            "tpf": statistics.fmean(tpf) if tpf else None, "chosen": chosen}


def table(rows: list[dict]) -> str:
    out = ["| mode | concurrency | requests | req/s | tokens/s | p50 latency (s) | p95 latency (s) | TPF |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = r["mode"]
        if mode == "auto":
            mode += " (" + ", ".join(f"{k} {v}" for k, v in sorted(r["chosen"].items())) + ")"
        tpf = f"{r['tpf']:.2f}" if r["tpf"] is not None else "-"
        out.append(f"| {mode} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                   f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {tpf} |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint folder, served in-process")
    src.add_argument("--tiny", action="store_true", help="train the tiny test model (about a minute) and serve it")
    src.add_argument("--url", help="benchmark a running server instead")
    p.add_argument("--api-key", default=None)
    p.add_argument("--modes", default="ar,diffusion,spec,spec-quadratic,auto")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 x C))")
    p.add_argument("--rounds", type=int, default=3, help="repeat the sweep (default 3)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the in-process server")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def serve_in_process(args, levels: list[int]):
    import torch

    import tridlm
    from tridlm.server import EngineConfig, ServerConfig, ServerThread, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from tridlm.training.quick import train_tiny_model

        folder = os.path.join(tempfile.mkdtemp(prefix="tridlm-bench-"), "tiny")
        print("training the tiny model ...", file=sys.stderr, flush=True)
        model, _ = train_tiny_model(folder, seconds=60, seed=0)
    else:
        model = tridlm.load(args.model).eval()
    need = max(levels)
    cfg = ServerConfig(engine=EngineConfig(max_running=need, max_queue=4 * need))
    return ServerThread(create_app(model, config=cfg)).start(), model


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    server = None
    url = args.url
    if url is None:
        server, model = serve_in_process(args, levels)
        url = server.url
        print(f"serving {args.model or 'the tiny model'} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters) at {url}", file=sys.stderr)
    body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "block_length": args.block_length}
    runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in levels}
    try:
        for mode in modes:  # one warm-up request per mode (first-use costs stay out of the numbers)
            asyncio.run(level(url, args.api_key, mode, 1, 1, body))
        for k in range(args.rounds):
            for c in levels:
                for mode in modes:
                    n = args.requests or max(8, 2 * c)
                    r = asyncio.run(level(url, args.api_key, mode, c, n, body))
                    runs[mode, c].append(r)
                    print(f"round {k + 1} {mode:>15} C={c:<3} {r['tokens_per_s']:8.1f} tok/s", file=sys.stderr,
                          flush=True)
    finally:
        if server is not None:
            server.stop()
    rows = [summarize(runs[m, c]) for m in modes for c in levels if runs[m, c]]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "runs": [r for rs in runs.values() for r in rs]}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
