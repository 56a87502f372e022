"""`tridlm train RECIPE [--key value ...]`: run a training recipe; command-line pairs override its keys."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune a tri-mode model from a recipe (YAML or TOML)",
        description="Train with the joint AR + block-diffusion objective. The recipe configures the run; "
                    "each --section.key value pair overrides one of its keys (e.g. --train.steps 100). "
                    "Launch with torchrun for several processes (DDP, or FSDP with --train.parallel fsdp).")
    p.add_argument("recipe", help="recipe file (.yaml, .yml or .toml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value pairs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.recipe import load_recipe
    from ..training.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe)
    vals = [r for r in result.history if r.get("kind") == "val"]
    summary = ""
    if vals:
        diff = vals[-1]["diff_loss"]
        summary = f"; val AR loss {vals[-1]['ar_loss']:.3f}, diffusion loss {'-' if diff is None else f'{diff:.3f}'}"
    if result.is_main:
        print(f"done: {result.steps} steps{summary}; model in {result.final_model}")
    return 0
