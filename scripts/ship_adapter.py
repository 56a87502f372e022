"""Copy a drafter run's adapter into the package as the default model's drafter, in bf16.

    python scripts/ship_adapter.py runs/smollm2-drafter-gpu

bf16 halves the file (the repository ships at most 50 MB of weights); loading casts it back to the
model's dtype. The run's recipe is copied beside it, so the shipped model says how it was made.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tridlm.default_model import asset_dir
from tridlm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a training run folder (its model/linear_spec_lora is shipped)")
    ap.add_argument("--recipe", type=Path, default=None, help="recipe file to ship beside it (default: the run's)")
    args = ap.parse_args()
    src = args.run / "model" / "linear_spec_lora"
    dst = asset_dir() / "linear_spec_lora"
    tensors = load_file(str(src / ADAPTER_WEIGHTS))
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(dst / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    shutil.copy(src / ADAPTER_CONFIG, dst / ADAPTER_CONFIG)
    recipe = args.recipe or args.run / "recipe.yaml"
    if recipe.is_file():
        shutil.copy(recipe, asset_dir() / "recipe.yaml")
    print(f"shipped {len(tensors)} tensors to {dst}")


if __name__ == "__main__":
    main()
