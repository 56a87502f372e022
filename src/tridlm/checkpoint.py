"""Checkpoint folders in the Hugging Face / NLD layout.

    config.json                   NLD field names (model_type nemotron_labs_diffusion)
    model.safetensors             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json (+ tokenizer_config.json)
    generation_config.json

Saving is atomic: everything is written to a temporary sibling folder, fsynced, then renamed into
place, so a crash never leaves a half-written checkpoint under the final name. Reading never unpickles;
`tridlm.loader` builds a TriModeLM from a folder after checking every header against the config.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from . import lora
from .config import ModelConfig
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .model import TriModeLM

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor at fault."""


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _state_dict_for_saving(model: TriModeLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" not in k}
    if model.config.tie_word_embeddings:
        sd.pop("diffusion_head.weight", None)  # stored once, as the embedding
    return sd


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    if cur:
        shards.append(cur)
    return shards


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_folder_write(path: Path, write_into) -> None:
    """Call `write_into(tmp_folder)`, then make tmp_folder appear as `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_into(tmp)
        _fsync_tree(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: TriModeLM, path, tokenizer: Tokenizer | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         generation_config: dict | None = None, extra_files: dict[str, bytes] | None = None) -> None:
    sd = _state_dict_for_saving(model)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")

    def write_into(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
        shards = _shards(sd, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
               "mask_token_id": model.config.mask_token_id, "block_length": model.config.block_size,
               "threshold": 0.9}
        gen.update(generation_config or {})
        (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if model.draft_adapter is not None:
            lora.save(model, tmp / lora.ADAPTER_DIR)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    atomic_folder_write(Path(path), write_into)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _is_pickle(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return False
    return head[:1] == b"\x80" or head[:2] == b"PK"  # raw pickle protocol 2+ or torch's zip format


def read_safetensors_header(p: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape}; checks the file holds every byte its header promises."""
    size = p.stat().st_size
    if _is_pickle(p):
        raise CheckpointError(f"{p} is a pickle file, not safetensors; tridlm never unpickles checkpoints "
                              "(unpickling runs arbitrary code). Re-save it as safetensors.")
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{p} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{p} is truncated: its header needs {8 + n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{p} has a corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{p} is truncated: its tensors need {8 + n + end} bytes but the file has {size} "
                              "(an interrupted copy or download?)")
    return {k: {"dtype": v["dtype"], "shape": tuple(v["shape"])} for k, v in header.items()}


def read_config(path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG}; a tridlm/NLD checkpoint folder needs one")
    try:
        d = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        idx = json.loads((path / INDEX).read_text())
        files = sorted(set(idx["weight_map"].values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{path / INDEX} names {f}, which is missing from {path}")
        return [path / f for f in files]
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); tridlm never "
                              "unpickles checkpoints (unpickling runs arbitrary code). Convert them to "
                              "model.safetensors first.")
    raise CheckpointError(f"{path} has no {WEIGHTS} (nor {INDEX}); the weights are missing")


def generation_defaults(path) -> dict:
    p = Path(path) / GENERATION_CONFIG
    return json.loads(p.read_text()) if p.is_file() else {}
