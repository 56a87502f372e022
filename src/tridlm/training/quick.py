"""A tiny tri-mode model trained on Shakespeare in about a minute of CPU time (for tests and demos).

It runs the shipped recipe `recipes/tiny-shakespeare.yaml` (mirrored in `TINY_RECIPE`, so it also
works from an installed package) with a step count calibrated to the requested time: a fixed
number of steps, rather than a deadline, keeps the result the same on a busy or an idle machine.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..checkpoint import load, save
from ..model import TriModeLM
from ..tokenizer import Tokenizer
from .recipe import load_recipe
from .trainer import train

# Steps per second of requested time, measured for TINY_RECIPE on an idle 2-core CPU.
STEPS_PER_SECOND = 2.0
METRICS_FILE = "training_metrics.jsonl"

TINY_RECIPE = {
    "seed": 0,
    "model": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 3,
              "num_key_value_heads": 3, "max_position_embeddings": 1024, "block_size": 8},
    "tokenizer": {"vocab_size": 1024},
    "data": {"sources": ["shakespeare"], "seq_len": 128, "val_fraction": 0.05},
    "objective": {"alpha": 0.3},
    "train": {"steps": 120, "global_batch": 16, "micro_batch": 16, "lr": 3e-3, "min_lr": 3e-4,
              "warmup_steps": 12, "schedule": "cosine"},
    "eval": {"every": 40, "sequences": 32},
    "checkpoint": {"every": 40, "keep": 2},
}


def train_tiny_model(folder, seconds: float = 60, seed: int = 0) -> tuple[TriModeLM, Tokenizer]:
    """Train TINY_RECIPE for about `seconds`, save the model (with its BPE tokenizer, a ChatML template
    and the run's metrics as `training_metrics.jsonl`) as a checkpoint folder `folder`, and load it."""
    steps = max(10, round(seconds * STEPS_PER_SECOND))
    run_dir = Path(tempfile.mkdtemp(prefix="tridlm-tiny-"))
    try:
        recipe = load_recipe(base=TINY_RECIPE, overrides={
            "out_dir": str(run_dir), "seed": seed, "resume": False, "train.steps": steps,
            "train.warmup_steps": max(1, steps // 10), "eval.every": 0, "checkpoint.every": 0,
            "log.progress": False, "log.plot": False})
        result = train(recipe)
        model = load(result.final_model)
        metrics = (run_dir / "metrics.jsonl").read_bytes()
        save(model, folder, tokenizer=model.tokenizer, extra_files={METRICS_FILE: metrics})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    loaded = load(folder)
    return loaded, loaded.tokenizer
