"""Training checkpoints: a standard checkpoint folder plus `trainer_state.pt`, written atomically.

    <out_dir>/checkpoints/step-00000100/
        config.json, model.safetensors, tokenizer.json, ...   (so `tridlm.load` opens it)
        trainer_state.pt   step, samples seen, optimizer, RNG states, the recipe

`trainer_state.pt` holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`: resuming never unpickles arbitrary objects.

The RNG states saved are rank 0's and are restored on every rank. The loop itself draws from no
global generator (data order and noise come from their own seeded generators), so this is enough
for every rank to continue exactly.
"""

from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import save

TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (a folder appears only once fully written)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def remove_stale_temporaries(root: Path) -> None:
    """Leftovers of a save killed midway (the final folders are never half-written)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    for _, p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model, tokenizer, trainer_state: dict, generation_config: dict | None = None) -> None:
    """Model, tokenizer and trainer state in one atomic folder write."""
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    save(model, folder, tokenizer=tokenizer, generation_config=generation_config,
         extra_files={TRAINER_STATE: buf.getvalue()})


def load_trainer_state(folder: Path) -> dict:
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
