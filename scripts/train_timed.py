"""Run a training recipe inside a wall-clock budget, e.g. a lent GPU for a fixed number of minutes.

    python scripts/train_timed.py recipes/smollm2-drafter-gpu.yaml --budget-s 330 [--key value ...]

A few steps are timed first (in a scratch folder, on the same data); then train.steps is set so that
the run ends inside the budget, checkpoints are spread over it (for an acceptance curve), and the
recipe with the chosen step count is written next to the run before it starts, so the run can be
reproduced or resumed with `tridlm train <out_dir>/recipe.yaml`. The schedule (warm-up, decay) is
laid out over the chosen step count, unlike a run cut short by a timeout.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml

from tridlm.training import distributed
from tridlm.training.recipe import load_recipe, parse_overrides
from tridlm.training.trainer import Trainer, train


def time_steps(recipe, n: int) -> float:
    """Median seconds per optimizer step over n steps (the first two, warm-up, not counted)."""
    trainer = Trainer(recipe)
    try:
        trainer.setup()
        times = []
        for step in range(n):
            t0 = time.perf_counter()
            trainer.train_step(step)
            if trainer.d.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])
    finally:
        distributed.teardown(trainer.d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--budget-s", type=float, required=True, help="seconds the training steps may take")
    ap.add_argument("--timing-steps", type=int, default=6)
    ap.add_argument("--curve-points", type=int, default=4, help="checkpoints kept along the run")
    ap.add_argument("--gguf", default=None, help="init_from smollm2: convert this GGUF file instead")
    args, rest = ap.parse_known_args()
    overrides = parse_overrides(rest)
    recipe = load_recipe(args.recipe, overrides)
    if recipe.init_from == "smollm2":
        from tridlm.convert import smollm2_base

        recipe.init_from = str(smollm2_base(gguf_path=args.gguf))
    out = Path(recipe.out_dir)
    data_dir = recipe.data.cache_dir or str(out / "data")
    scratch = out.parent / f"{out.name}-timing"
    timing = load_recipe(base=recipe.to_dict(), overrides={
        "out_dir": str(scratch), "data.cache_dir": data_dir, "train.steps": 10**6, "eval.at_start": False,
        "eval.every": 0, "checkpoint.every": 0})
    per_step = time_steps(timing, args.timing_steps)
    shutil.rmtree(scratch, ignore_errors=True)
    steps = max(args.curve_points, int(args.budget_s / per_step))
    every = math.ceil(steps / args.curve_points)
    final = load_recipe(base=recipe.to_dict(), overrides={
        "train.steps": steps, "data.cache_dir": data_dir, "checkpoint.every": every,
        "checkpoint.keep": args.curve_points, "eval.every": every})
    print(f"{per_step:.3f} s/step -> {steps} steps, a checkpoint every {every}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(final.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    train(final)
    print(f"trained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
