"""A source (GGUF file or Hugging Face folder) into a checkpoint folder, or into a model in memory."""

from __future__ import annotations

import json
from pathlib import Path

from ..model import TriModeLM
from .common import CONVERTER_VERSION, ConvertError, Imported, build, file_sha256, prepare_out
from .from_gguf import inspect_gguf, is_gguf
from .from_hf import inspect_hf_folder


def inspect_source(source) -> Imported:
    """Read a source's settings and tensor headers only (fast); raises ConvertError on anything unsupported."""
    source = Path(source)
    if source.is_dir():
        return inspect_hf_folder(source)
    if not source.exists():
        raise ConvertError(f"{source} does not exist; give a .gguf file or a Hugging Face model folder")
    if is_gguf(source):
        return inspect_gguf(source)
    raise ConvertError(f"{source} is neither a GGUF file nor a folder; give a .gguf file or a Hugging Face "
                       "model folder (config.json + *.safetensors)")


def load_source(source, mask_token: str | int | None = None, add_mask_token: bool = False,
                dtype="float32") -> TriModeLM:
    """The converted model in memory, with its tokenizer attached as `.tokenizer`."""
    return build(inspect_source(source), mask_token, add_mask_token, dtype)


def _convert(imp: Imported, out, mask_token, add_mask_token, dtype, overwrite) -> Path:
    out = prepare_out(out, imp.source, overwrite)
    model = build(imp, mask_token, add_mask_token, dtype)
    info = {"converter_version": CONVERTER_VERSION, "source": imp.source.name, "source_format": imp.kind,
            "mask_token": model.tokenizer.hf.id_to_token(model.config.mask_token_id) if model.tokenizer else None,
            "mask_token_id": model.config.mask_token_id, "mask_token_added": bool(add_mask_token)}
    if imp.source.is_file():  # names the exact base an adapter trained on this checkpoint applies to
        info["source_sha256"] = file_sha256(imp.source)
    model.save(out, extra_files={"conversion.json": json.dumps(info, indent=2).encode()})
    return out


def convert(source, out, mask_token: str | int | None = None, add_mask_token: bool = False,
            dtype="float32", overwrite: bool = False) -> Path:
    """Convert a GGUF file or a Hugging Face folder into the checkpoint folder `out` (written atomically).

    mask_token: an unused special token (text or id) to reuse as the mask; None picks the tokenizer's
        mask token or a known unused special (SmolLM2: `<empty_output>`).
    add_mask_token: append `<|mask|>` as a new token instead (embedding and head grow by one row,
        initialised to the mean row).
    """
    return _convert(inspect_source(source), out, mask_token, add_mask_token, dtype, overwrite)


def convert_gguf(path, out, mask_token: str | int | None = None, add_mask_token: bool = False,
                 dtype="float32", overwrite: bool = False) -> Path:
    return _convert(inspect_gguf(path), out, mask_token, add_mask_token, dtype, overwrite)


def convert_hf_folder(path, out, mask_token: str | int | None = None, add_mask_token: bool = False,
                      dtype="float32", overwrite: bool = False) -> Path:
    return _convert(inspect_hf_folder(path), out, mask_token, add_mask_token, dtype, overwrite)
