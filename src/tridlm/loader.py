"""A checkpoint folder (tridlm.checkpoint's layout) into a TriModeLM: every file header is checked
against the config before any weight is allocated, then the weights are read into place."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from . import lora
from .checkpoint import SAFETENSORS_DTYPES, CheckpointError, read_config, read_safetensors_header, weight_files
from .config import ModelConfig
from .model import TriModeLM
from .tokenizer import Tokenizer


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = TriModeLM(config)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("diffusion_head.weight")
    return shapes


def validate(path) -> tuple[ModelConfig, dict[str, Path]]:
    """Check a folder fully before any weight is allocated; returns the config and tensor -> file."""
    path = Path(path)
    config = read_config(path)
    files = weight_files(path)
    located: dict[str, Path] = {}
    found: dict[str, tuple] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"tensor {name} in {f.name} has dtype {info['dtype']}; expected a float type")
            found[name] = info["shape"]
            located[name] = f
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unexpected = sorted(set(found) - set(expected) - {"diffusion_head.weight"})
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                              + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
                              + " (a different architecture, or config.json does not match the weights)")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(found[name])} in {located[name].name}, "
                                  f"but config.json implies {list(shape)}")
    return config, located


def load(path, dtype: torch.dtype = torch.float32, device="cpu", load_tokenizer: bool = True,
         draft_adapter: bool | str | Path = True) -> TriModeLM:
    """Load a checkpoint folder into a TriModeLM (with `.tokenizer` attached when the folder has one).

    draft_adapter: True loads `<path>/linear_spec_lora` when present (NLD's optional LoRA drafter);
    False skips it; a path loads the adapter from there.
    """
    path = Path(path)
    config, located = validate(path)
    with torch.device("meta"):
        model = TriModeLM(config)
    model = model.to_empty(device=device)
    by_file: dict[Path, list[str]] = {}
    for name, f in located.items():
        by_file.setdefault(f, []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in names:
                    if name == "diffusion_head.weight" and config.tie_word_embeddings:
                        continue
                    params[name].copy_(st.get_tensor(name))
    if config.tie_word_embeddings:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    adapter_dir = Path(draft_adapter) if isinstance(draft_adapter, str | Path) else path / lora.ADAPTER_DIR
    if draft_adapter is not False and (adapter_dir.is_dir() or not isinstance(draft_adapter, bool)):
        lora.load(model, adapter_dir)
    model = model.to(dtype).eval()
    if load_tokenizer and (path / "tokenizer.json").is_file():
        model.tokenizer = Tokenizer.from_folder(path)
    return model
