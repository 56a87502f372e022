"""Load benchmark of `tridlm serve`: throughput and p50/p95 latency by mode and concurrency.

    python scripts/load_bench.py --model out/tiny                 # starts a server in-process on 127.0.0.1
    python scripts/load_bench.py --model default --scenario mixed # 32 clients x 4 mixed-mode requests
    python scripts/load_bench.py --tiny                           # trains the test suite's tiny model first
    python scripts/load_bench.py --url http://127.0.0.1:8000      # a running server

--scenario sweep (default): C clients (asyncio, one connection each) send completions back to back,
each a fixed length (ignore_eos) so that every mode makes the same tokens; a level ends after `--requests` requests
(default 2 x C, at least 8). Levels run mode after mode within each concurrency, and the whole sweep
`--rounds` times, so drift in the machine's load spreads over every mode alike. Reported per (mode, C):
the median over rounds of requests/s and generated tokens/s (over each level's wall time), p50/p95
request latency over all rounds' requests, and the mean tokens per forward the server reported.

--scenario mixed: C clients (default 32) each send R requests (default 4) back to back, the modes in
turn (ar, diffusion, spec, spec-quadratic), every knob at the server's default (no block_length);
each distinct request is first run alone (after a warm-up, `--solo-repeats` times: its solo latency is
the median), and the report says how many failed, how many differ from their solo run, p50/p95/p99
latency per mode, the p95 over requests of latency / solo latency, the modes of the requests at or
above it, and per mode and prompt the solo latency and the median and largest latency / solo. `--rounds`
(default 1 here) repeats the whole load: the percentiles pool every round's requests, and each round's own
figures are listed beside them.

--scenario abuse: one client sends the widest requests the server's limits allow, back to back,
while --small-clients others each send --small-requests 2-token AR requests; reported: the small
requests' p50/p95/max latency beside their latency on an idle server.

--scenario batched: no server; the mixed scenario's prompts, each mode's share as the rows of one
generate() call: the throughput floor under the mixed scenario's wall time on this machine.
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


MIXED_MODES = ("ar", "diffusion", "spec", "spec-quadratic")


async def _post(c: httpx.AsyncClient, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = await c.post("/v1/completions", json=body)
    took = time.perf_counter() - t0
    return took, (r.json() if r.status_code == 200 else {"error": r.status_code, "body": r.text[:200]})


def mixed_bodies(clients: int, per_client: int, max_tokens: int) -> list[list[dict]]:
    """Per client, its requests: the modes in turn, default knobs, greedy, a fixed length."""
    out = []
    for c in range(clients):
        out.append([{"prompt": PROMPTS[(c + i) % len(PROMPTS)], "mode": MIXED_MODES[(c + i) % len(MIXED_MODES)],
                     "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True} for i in range(per_client)])
    return out


async def run_mixed(url: str, key: str | None, clients: int, per_client: int, max_tokens: int, rounds: int = 1,
                    solo_repeats: int = 3) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    plan = mixed_bodies(clients, per_client, max_tokens)
    distinct = {json.dumps(b, sort_keys=True): b for bodies in plan for b in bodies}
    solo: dict[str, tuple[float, dict]] = {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600) as c:
        for k, b in distinct.items():  # alone, one after another (a warm-up first: first-use costs stay out)
            await _post(c, b)
            runs = [await _post(c, b) for _ in range(max(1, solo_repeats))]
            solo[k] = (statistics.median(took for took, _ in runs), runs[0][1])
    results: list[tuple[dict, float, dict, int]] = []  # (body, latency, response, its place in its client's turn)
    per_round = []

    async def client(c: httpx.AsyncClient, bodies, into):
        for i, b in enumerate(bodies):
            took, out = await _post(c, b)
            into.append((b, took, out, i))

    def over_solo(rs) -> list[float]:
        return [took / solo[json.dumps(b, sort_keys=True)][0] for b, took, *_ in rs]

    wall = 0.0
    for _ in range(rounds):
        mine: list[tuple[dict, float, dict, int]] = []
        # every client's connection is made (and used once) before the clock starts: the clients' own set-up,
        # which shares this machine's cores with the server, stays out of the requests' latencies
        conns = [httpx.AsyncClient(base_url=url, headers=headers, timeout=3600) for _ in plan]
        try:
            await asyncio.gather(*(c.get("/health") for c in conns))
            t0 = time.perf_counter()
            await asyncio.gather(*(client(c, bodies, mine) for c, bodies in zip(conns, plan, strict=True)))
            took = time.perf_counter() - t0
        finally:
            await asyncio.gather(*(c.aclose() for c in conns))
        wall += took
        results += mine
        theirs = over_solo(mine)
        per_round.append({"wall_s": took, "p95_latency_over_solo": percentile(theirs, 0.95),
                          "median_latency_over_solo": percentile(theirs, 0.5)})
    failed = sum("error" in out for _, _, out, _ in results)
    differs = [b for b, _, out, _ in results if "error" not in out and out["choices"][0]["text"]
               != solo[json.dumps(b, sort_keys=True)][1]["choices"][0]["text"]]
    ratios = over_solo(results)
    p95 = percentile(ratios, 0.95)
    top = [b["mode"] for r, (b, *_) in zip(ratios, results, strict=True) if r >= p95]  # who sets the p95
    per_mode = {}
    for m in MIXED_MODES:
        lat = [took for b, took, *_ in results if b["mode"] == m]
        alone = [solo[json.dumps(b, sort_keys=True)][0] for b, *_ in results if b["mode"] == m]
        if lat:
            per_mode[m] = {"requests": len(lat), "differ_from_solo": sum(b["mode"] == m for b in differs),
                           "solo_median_s": statistics.median(alone),
                           "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95),
                           "p99_s": percentile(lat, 0.99)}
    return {"clients": clients, "per_client": per_client, "max_tokens": max_tokens, "rounds": rounds,
            "solo_repeats": solo_repeats, "wall_s": wall / rounds, "requests": len(results), "failed": failed,
            "differ_from_solo": len(differs), "p95_latency_over_solo": p95,
            "at_or_above_p95_by_mode": {m: top.count(m) for m in MIXED_MODES},
            "median_latency_over_solo": percentile(ratios, 0.5), "per_mode": per_mode, "per_round": per_round,
            # per mode and prompt (each mode meets two of the prompts): a prompt whose solo run is fast sets the p95
            "by_mode_and_prompt": by_mode_and_prompt(results, ratios, solo),
            # the median latency / solo of each client's first, second, ... request: the first ones start together
            "median_over_solo_by_turn": [percentile([r for r, res in zip(ratios, results, strict=True) if res[3] == k],
                                                    0.5) for k in range(per_client)]}


def by_mode_and_prompt(results, ratios: list[float], solo: dict) -> dict:
    groups: dict[str, list[tuple[dict, float]]] = {}
    for (b, *_), r in zip(results, ratios, strict=True):
        groups.setdefault(f"{b['mode']} / {b['prompt']!r}", []).append((b, r))
    return {k: {"requests": len(v), "solo_s": solo[json.dumps(v[0][0], sort_keys=True)][0],
                "median_latency_over_solo": percentile([r for _, r in v], 0.5),
                "max_latency_over_solo": max(r for _, r in v)} for k, v in sorted(groups.items())}


async def run_abuse(url: str, key: str | None, limits: dict, small_clients: int, small_requests: int,
                    seconds_before: float = 30.0) -> dict:
    """One client loops the widest allowed request; small clients time 2-token AR requests meanwhile."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    small = {"prompt": "Once upon a time", "mode": "ar", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
        await _post(c, small)
        idle = [(await _post(c, small))[0] for _ in range(5)]
    worst = {"prompt": [1] + [28] * (limits["prompt_tokens"] - 1), "mode": "spec-quadratic",
             "block_length": limits["quadratic_block"], "n": limits["n"], "max_tokens": limits["max_tokens"],
             "temperature": 1.0, "seed": 0, "ignore_eos": True}  # sampled: it speculates however busy the server is
    stop = asyncio.Event()
    worst_answers: list = []

    async def abuser():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600) as c:
            while not stop.is_set():
                task = asyncio.ensure_future(c.post("/v1/completions", json=worst))
                done, _ = await asyncio.wait({task, asyncio.ensure_future(stop.wait())},
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    worst_answers.append(task.result().status_code)
                else:
                    task.cancel()  # the client leaves: the server frees its rows

    lat: list[float] = []

    async def small_client():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
            for _ in range(small_requests):
                took, out = await _post(c, small)
                lat.append(took if "error" not in out else float("inf"))

    bad = asyncio.ensure_future(abuser())
    running = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
        for _ in range(int(seconds_before * 20)):  # until the worst request is admitted and decoding
            running = (await c.get("/health")).json()["running_rows"]
            if running >= worst["n"]:
                break
            await asyncio.sleep(0.05)
    await asyncio.gather(*(small_client() for _ in range(small_clients)))
    stop.set()
    await bad
    shown = {k: v for k, v in worst.items() if k != "prompt"} | {"prompt_tokens": len(worst["prompt"])}
    return {"worst_request": shown,
            "worst_answers": worst_answers, "worst_rows_running": running, "small_requests": len(lat),
            "idle_median_s": statistics.median(idle),
            "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95), "max_s": max(lat)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint folder, 'default' or 'smollm2', served in-process")
    src.add_argument("--tiny", action="store_true", help="train the tiny test model (about a minute) and serve it")
    src.add_argument("--url", help="benchmark a running server instead")
    p.add_argument("--api-key", default=None)
    p.add_argument("--scenario", choices=("sweep", "mixed", "abuse", "batched"), default="sweep")
    p.add_argument("--clients", type=int, default=32, help="mixed: clients (default 32)")
    p.add_argument("--per-client", type=int, default=4, help="mixed: requests per client (default 4)")
    p.add_argument("--small-clients", type=int, default=4, help="abuse: clients sending small requests")
    p.add_argument("--small-requests", type=int, default=5, help="abuse: small requests per small client")
    p.add_argument("--modes", default="ar,diffusion,spec,spec-quadratic,auto")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 x C))")
    p.add_argument("--rounds", type=int, default=None,
                   help="repeat the sweep (default 3) or the mixed load (default 1)")
    p.add_argument("--solo-repeats", type=int, default=3,
                   help="mixed: runs of each distinct request alone, after a warm-up; its solo latency is the median")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the in-process server")
    p.add_argument("--max-running", type=int, default=None,
                   help="mixed/abuse: the in-process server's --max-running (default: tridlm serve's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default=None,
                   help="the in-process server's --dtype (default: the checkpoint's)")
    p.add_argument("--spec-off-at", type=int, default=None,
                   help="mixed/abuse: the in-process server's --spec-off-at (default: tridlm serve's; -1: never)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="the in-process server's --batch-invariant (bf16 forwards with solo bits in any batch)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def bench_model(args):
    if args.tiny:
        from tridlm.training.quick import train_tiny_model

        folder = os.path.join(tempfile.mkdtemp(prefix="tridlm-bench-"), "tiny")
        print("training the tiny model ...", file=sys.stderr, flush=True)
        model, _ = train_tiny_model(folder, seconds=60, seed=0)
    else:
        from tridlm.default_model import resolve_model

        model = resolve_model(args.model).eval()  # a folder, "default" or "smollm2"
    dtype = "bfloat16" if args.batch_invariant else args.dtype
    if dtype:
        from tridlm.commands.generate import prepared

        model = prepared(model, argparse.Namespace(dtype=dtype, kernels="eager"))  # as tridlm serve does
    return model.set_batch_invariant() if args.batch_invariant else model


def serve_in_process(args, levels: list[int]):
    import torch

    from tridlm.engine import off_this_thread
    from tridlm.server import EngineConfig, ServerConfig, ServerThread, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    # as tridlm serve does: the model is made off this thread, so the engine's worker holds the only OpenMP pool
    model = off_this_thread(bench_model, args)
    if args.scenario == "sweep":
        need = max(levels)
        cfg = ServerConfig(engine=EngineConfig(max_running=need, max_queue=4 * need))
    else:  # the server as `tridlm serve` configures it, but for the options given
        knobs = {} if args.max_running is None else {"max_running": args.max_running, "max_queue": 4 * args.max_running}
        if args.spec_off_at is not None:
            knobs["spec_off_at"] = None if args.spec_off_at < 0 else args.spec_off_at
        cfg = ServerConfig(engine=EngineConfig(**knobs))
    return ServerThread(create_app(model, config=cfg)).start(), model


def worst_allowed(model, cfg) -> dict:
    """The widest, longest request the server's limits accept: spec-quadratic at the widest block, the most
    rows and tokens whose cost stays under the engine's limit, a long prompt."""
    from tridlm.decoding.params import forward_width, quadratic_block_length

    lim, eng = cfg.limits, cfg.engine
    L = quadratic_block_length(eng.max_forward_width)
    prompt = min(lim.max_prompt_tokens, model.config.max_position_embeddings // 2)
    for n in range(lim.max_n, 0, -1):
        tokens = min(lim.max_tokens_cap, lim.max_new_tokens_total // n)
        if n * (prompt + tokens * forward_width("spec-quadratic", L)) <= eng.max_request_cost:
            break
    else:
        n, tokens = 1, max(1, (eng.max_request_cost - prompt) // forward_width("spec-quadratic", L))
    return {"quadratic_block": L, "n": n, "max_tokens": tokens, "prompt_tokens": prompt}


def report(args, out: dict) -> int:
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": out}, f, indent=1)
    return 0


def run_batched(args) -> dict:
    """--scenario batched: the mixed scenario's work with no server, each mode's C x R / 4 requests as the
    rows of one `generate()` call (spec and spec-quadratic as they are, and as AR), in the thread that
    loaded the model: the most throughput this machine gets for that work, the floor under its wall time."""
    import torch

    from tridlm.engine import off_this_thread

    if args.threads:
        torch.set_num_threads(args.threads)

    def run():
        model = bench_model(args)
        prompts = [b["prompt"] for bodies in mixed_bodies(args.clients, args.per_client, args.max_tokens)
                   for b in bodies]
        rows = len(prompts) // len(MIXED_MODES)
        model.generate(prompts[:2], "ar", max_new_tokens=4, ignore_eos=True)  # first-use costs stay out
        out = {"rows_per_mode": rows, "max_tokens": args.max_tokens, "seconds": {}}
        for mode in MIXED_MODES:
            t0 = time.perf_counter()
            model.generate(prompts[:rows], mode, max_new_tokens=args.max_tokens, ignore_eos=True)
            out["seconds"][mode] = time.perf_counter() - t0
            print(f"{mode:>15} {out['seconds'][mode]:.2f} s", file=sys.stderr, flush=True)
        s = out["seconds"]
        out["total_s"] = sum(s.values())
        out["total_with_speculation_as_ar_s"] = s["diffusion"] + 3 * s["ar"]
        return out

    return off_this_thread(run)


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    if args.scenario == "batched":
        return report(args, run_batched(args))
    server = None
    url = args.url
    if url is None:
        server, model = serve_in_process(args, levels)
        url = server.url
        print(f"serving {args.model or 'the tiny model'} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters) at {url}", file=sys.stderr)
    if args.scenario != "sweep":
        from tridlm.server import ServerConfig

        try:
            if args.scenario == "mixed":
                out = asyncio.run(run_mixed(url, args.api_key, args.clients, args.per_client, args.max_tokens,
                                            args.rounds or 1, args.solo_repeats))
            else:
                limits = worst_allowed(model, ServerConfig())
                out = asyncio.run(run_abuse(url, args.api_key, limits, args.small_clients, args.small_requests))
        finally:
            if server is not None:
                server.stop()
        return report(args, out)
    body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "block_length": args.block_length}
    runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in levels}
    try:
        for mode in modes:  # one warm-up request per mode (first-use costs stay out of the numbers)
            asyncio.run(level(url, args.api_key, mode, 1, 1, body))
        for k in range(args.rounds or 3):
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
