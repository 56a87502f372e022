"""Acceptance and diffusion TPF of a drafter run's checkpoints against the training tokens they saw.

    python scripts/drafter_curve.py runs/smollm2-drafter --prompts 6 --max-new-tokens 32 --block-length 4
    python scripts/drafter_curve.py --adapter default --prompts 12 --max-new-tokens 48 --block-length 4,8,16

Each checkpoint's adapter goes on the frozen base; self-speculation (greedy, one-pass drafts) gives
the mean acceptance length, diffusion (threshold 0.9) the tokens per forward, over the same prompts
(GSM8K, HumanEval and story openings, interleaved). Step 0 is the base model with no drafter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tridlm
from tridlm.bench.prompts import load_prompts
from tridlm.training.state import list_checkpoints


def measure(model, prompts, max_new_tokens: int, block_length: int) -> dict:
    acc, spec_tokens, diff_tokens, diff_forwards = [], 0, 0, 0
    for p in prompts:
        text = p.render(model.tokenizer)
        s = model.generate(text, mode="spec", max_new_tokens=max_new_tokens, block_length=block_length,
                           add_special_tokens=False)
        acc += s.rows[0].metrics.acceptance_lengths
        spec_tokens += s.rows[0].metrics.generated_tokens
        d = model.generate(text, mode="diffusion", max_new_tokens=max_new_tokens, block_length=block_length,
                           threshold=0.9, add_special_tokens=False)
        diff_tokens += d.rows[0].metrics.generated_tokens
        diff_forwards += d.rows[0].metrics.forwards
    return {"mean_acceptance": sum(acc) / len(acc), "diffusion_tpf": diff_tokens / diff_forwards}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, nargs="?", help="a drafter training run (its checkpoints are measured)")
    ap.add_argument("--adapter", default=None, help="measure this adapter folder ('default': the shipped one) instead")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--block-length", default="4", help="a length or a comma-separated list of them")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", default="", help="comma-separated checkpoint steps (default: all kept, and 0)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adapter is not None:
        from tridlm.default_model import locate_model

        default = locate_model("default")  # the cached SmolLM2 base and the shipped drafter
        adapter = default.draft_adapter if args.adapter == "default" else Path(args.adapter)
        base = str(default.folder)
        run_curve(base, [(None, adapter)], 0, args)
        return
    if args.run is None:
        ap.error("give a run folder or --adapter")
    recipe = json.loads((args.run / "recipe.json").read_text())
    tokens_per_step = recipe["train"]["global_batch"] * recipe["data"]["seq_len"]
    ckpts = [(0, None)] + list_checkpoints(args.run / "checkpoints")
    if args.steps:
        wanted = {int(s) for s in args.steps.split(",")}
        ckpts = [c for c in ckpts if c[0] in wanted]
    ckpts = [(step, False if folder is None else folder / "linear_spec_lora") for step, folder in ckpts]
    run_curve(recipe["init_from"], ckpts, tokens_per_step, args)


def run_curve(base, ckpts, tokens_per_step: int, args) -> None:
    prompts = load_prompts("mixed", args.prompts)
    for step, adapter in ckpts:
        model = tridlm.load(base, device=args.device, draft_adapter=adapter)
        for block_length in (int(b) for b in str(args.block_length).split(",")):
            with torch.inference_mode():
                r = measure(model, prompts, args.max_new_tokens, block_length)
            where = {"adapter": str(adapter)} if step is None else {"step": step, "tokens": step * tokens_per_step}
            print(json.dumps({**where, "block_length": block_length, **r}), flush=True)


if __name__ == "__main__":
    main()
