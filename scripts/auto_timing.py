"""What mode="auto" chooses on an idle engine, request after request, and the per-token speeds it judged by.

    python scripts/auto_timing.py --requests 7 --max-tokens 24 --threads 2

Each request is greedy and alone; the engine times every decode forward that holds one row alone, per mode
(`EngineStats.solo_decode`), and auto speculates at light load only while that made speculation faster.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the default model)")
    p.add_argument("--requests", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from tridlm.decoding import GenerationParams
    from tridlm.default_model import locate_model
    from tridlm.engine import Engine, off_this_thread

    if args.threads:
        torch.set_num_threads(args.threads)
    model = off_this_thread(lambda: locate_model(args.model).load())
    engine = Engine(model)
    ids = model.tokenizer.encode(args.prompt)
    try:
        for i in range(args.requests):
            t0 = time.perf_counter()
            req = engine.submit([ids], GenerationParams(mode="auto", max_new_tokens=args.max_tokens, ignore_eos=True))
            for _ in req.iter_events(timeout=600):
                pass
            speeds = ", ".join(f"{m} {1000 * s / n:.1f} ms/token over {n}" for m, (s, n) in
                               sorted(engine.stats().solo_decode.items()) if n)
            print(f"request {i}: {req.mode:<5} {time.perf_counter() - t0:.2f} s   alone so far: {speeds}", flush=True)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
