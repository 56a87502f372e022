"""How often greedy results differ between a batch and each row alone, and between self-speculation and AR,
on this machine: the default model (or --model) in fp32, bf16, and bf16 with batch-invariant forwards.

    python scripts/batch_invariance.py                       # all three, every mode, 16 prompts x 24 tokens
    python scripts/batch_invariance.py --setups bf16-invariant --prompts 32

For each setup and mode: the prompts as one batch of generate(), then one by one; reported are the rows
that differ, the seconds of the batch and of a row alone (median), and for spec / spec-quadratic the rows
whose solo tokens differ from AR's solo tokens. Greedy, ignore_eos, the mode's default block length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

MODES = ("ar", "diffusion", "spec", "spec-quadratic")
SETUPS = ("fp32", "bf16", "bf16-invariant")


def prepared(model, setup: str):
    import torch

    if setup == "fp32":
        return model.to(torch.float32)
    model = model.to(torch.bfloat16).set_weight_format("float")  # tridlm serve --dtype bfloat16
    return model.set_batch_invariant() if setup == "bf16-invariant" else model


def measure(model, prompts: list[str], max_tokens: int) -> dict:
    import torch

    out, solo_ids = {}, {}
    with torch.inference_mode():
        model.generate(prompts[:2], "ar", max_new_tokens=4, ignore_eos=True)  # first-use costs stay out
        for mode in MODES:
            t0 = time.perf_counter()
            batch = model.generate(prompts, mode, max_new_tokens=max_tokens, ignore_eos=True)
            batch_s = time.perf_counter() - t0
            alone, times = [], []
            for p in prompts:
                t0 = time.perf_counter()
                alone.append(model.generate([p], mode, max_new_tokens=max_tokens, ignore_eos=True).rows[0].ids)
                times.append(time.perf_counter() - t0)
            solo_ids[mode] = alone
            out[mode] = {"differ_batched_vs_solo": sum(r.ids != a for r, a in zip(batch.rows, alone, strict=True)),
                         "batch_s": round(batch_s, 3), "solo_median_s": round(statistics.median(times), 3)}
    for mode in ("spec", "spec-quadratic"):
        out[mode]["differ_from_ar"] = sum(a != b for a, b in zip(solo_ids[mode], solo_ids["ar"], strict=True))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a folder, 'default' or 'smollm2'")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        p.error(f"unknown setup(s) {unknown}; choose from {', '.join(SETUPS)}")
    import torch

    from tridlm.default_model import resolve_model
    from tridlm.engine import off_this_thread
    from tridlm.machine import cpu_isa, cpu_name

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from load_bench import PROMPTS

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    results = {"cpu": cpu_name(), "isa": cpu_isa(), "threads": torch.get_num_threads(), "prompts": args.prompts,
               "max_tokens": args.max_tokens, "setups": {}}
    for setup in setups:  # each in one thread of its own, which also loads the model (one OpenMP pool)
        results["setups"][setup] = off_this_thread(
            lambda setup=setup: measure(prepared(resolve_model(args.model).eval(), setup), prompts, args.max_tokens))
        print(setup, json.dumps(results["setups"][setup]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
