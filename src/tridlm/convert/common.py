"""What every source shares: the error type, the imported-model record, the mask token and the build.

A source (GGUF file, Hugging Face folder) is read in two steps: `inspect` reads only metadata and
tensor headers and raises `ConvertError` for anything tridlm cannot represent; only then are the
weights read. So a bad source fails in well under a second, before any dequantization or copying.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken

from ..config import ConfigError, ModelConfig
from ..model import TriModeLM
from ..tokenizer import MASK_TOKEN, Tokenizer

# bumped whenever a conversion's output changes, so cached conversions are redone
CONVERTER_VERSION = 1
# Unused special tokens of known vocabularies, tried in order when no mask token is named.
KNOWN_UNUSED_SPECIALS = ("<empty_output>", "<|reserved_special_token_0|>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(ValueError):
    """A source tridlm convert cannot import; the message names the problem and the fix."""


@dataclass
class Imported:
    """A source after inspection: everything but the weights, plus a way to read them."""

    source: Path
    kind: str  # "gguf" | "hf"
    config: dict  # ModelConfig keyword arguments (mask_token_id still unset)
    tokenizer: Tokenizer | None
    shapes: dict[str, tuple[int, ...]]  # tridlm tensor name -> shape, as the source stores it
    read_tensors: Callable[[], dict[str, torch.Tensor]]  # tridlm names, float32
    notes: list[str] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_config(cfg: dict, source: Path) -> ModelConfig:
    try:
        return ModelConfig(**cfg)
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"{source}: the model's settings do not make a valid tridlm config ({e})") from None


def check_shapes(imp: Imported) -> None:
    """Compare the source's tensor shapes with those its config implies, before reading any weight."""
    from ..loader import expected_shapes

    cfg = dict(imp.config, mask_token_id=0)
    expected = expected_shapes(model_config(cfg, imp.source))
    if not cfg["tie_word_embeddings"]:
        expected["diffusion_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    missing = sorted(set(expected) - set(imp.shapes))
    if missing:
        raise ConvertError(f"{imp.source}: missing tensor(s) {', '.join(missing[:4])}"
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                           + " (an incomplete file, or not a Llama-family model)")
    extra = sorted(set(imp.shapes) - set(expected))
    if extra:
        raise ConvertError(f"{imp.source}: unexpected tensor(s) {', '.join(extra[:4])}"
                           + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
                           + "; tridlm's model has no place for them")
    for name, shape in expected.items():
        if tuple(imp.shapes[name]) != tuple(shape):
            raise ConvertError(f"{imp.source}: tensor {name} has shape {list(imp.shapes[name])}, "
                               f"but the model's settings imply {list(shape)}")


# ---------------------------------------------------------------------------------------------
# the mask token
# ---------------------------------------------------------------------------------------------
@dataclass
class MaskPlan:
    token_id: int
    token: str | None
    add: bool  # True: a new row is appended to the embedding (and head)


def _special_ids(cfg: dict) -> dict[int, str]:
    roles: dict[int, str] = {}
    for role in ("bos", "eos", "pad"):  # the first role wins when ids are shared (pad is often eos)
        if cfg.get(f"{role}_token_id") is not None:
            roles.setdefault(cfg[f"{role}_token_id"], role)
    return roles


def plan_mask(imp: Imported, mask_token: str | int | None, add_mask_token: bool) -> MaskPlan:
    """Choose the mask token; every refusal happens here, before the weights are read."""
    cfg, tok, src = imp.config, imp.tokenizer, imp.source
    vocab = cfg["vocab_size"]
    if add_mask_token:
        if mask_token is not None:
            raise ConvertError("give either a mask token to reuse or --add-mask-token, not both")
        if tok is not None:
            if tok.token_to_id(MASK_TOKEN) is not None:
                raise ConvertError(f"{src}: the vocabulary already has {MASK_TOKEN} "
                                   f"(id {tok.token_to_id(MASK_TOKEN)}); reuse it with --mask-token '{MASK_TOKEN}' "
                                   "instead of adding another")
            if tok.vocab_size != vocab:
                raise ConvertError(f"{src}: the embedding has {vocab} rows but the tokenizer {tok.vocab_size} tokens, "
                                   "so a new token's id would not match a new row; reuse a spare row with "
                                   "--mask-token-id N instead")
        return MaskPlan(vocab, MASK_TOKEN, add=True)

    if mask_token is None:
        mask_token = _default_mask(imp)
    if isinstance(mask_token, int):
        token_id = mask_token
        token = tok.hf.id_to_token(token_id) if tok is not None else None
    else:
        token = mask_token
        if tok is None:
            raise ConvertError(f"{src} has no tokenizer, so the mask token cannot be named by text; "
                               "give its id with --mask-token-id N, or use --add-mask-token")
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ConvertError(f"mask token {token!r} is not in the vocabulary of {src}; name an unused special "
                               "token that exists, or use --add-mask-token")
    if not 0 <= token_id < vocab:
        raise ConvertError(f"mask token id {token_id} is outside the vocabulary (0..{vocab - 1})")
    role = _special_ids(cfg).get(token_id)
    if role is not None:
        raise ConvertError(f"mask token id {token_id} is the model's {role} token; pick an unused special "
                           "token instead, or use --add-mask-token")
    if tok is not None and token is not None:
        added = tok.hf.get_added_tokens_decoder()
        if token_id not in added or not added[token_id].special:
            raise ConvertError(f"mask token {token!r} (id {token_id}) is an ordinary vocabulary token; reusing it "
                               "would stop the model from writing it. Name an unused special token, or use "
                               "--add-mask-token")
    return MaskPlan(token_id, token, add=False)


def _default_mask(imp: Imported) -> str | int:
    tok = imp.tokenizer
    if tok is not None:
        if tok.mask_id is not None:
            return tok.mask_id
        for cand in KNOWN_UNUSED_SPECIALS:
            if tok.token_to_id(cand) is not None:
                return cand
    raise ConvertError(f"{imp.source} has no mask token and no known unused special token; name one with "
                       "--mask-token TOKEN (or --mask-token-id N), or add one with --add-mask-token")


def _append_mean_row(w: torch.Tensor) -> torch.Tensor:
    # the mean row is a neutral start: it sits among the real tokens and favours none of them
    return torch.cat([w, w.mean(0, keepdim=True)], dim=0)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build(imp: Imported, mask_token: str | int | None = None, add_mask_token: bool = False,
          dtype="float32") -> TriModeLM:
    """Validate everything, then read the weights and return the tri-mode model (tokenizer attached)."""
    dtype = parse_dtype(dtype)
    check_shapes(imp)
    plan = plan_mask(imp, mask_token, add_mask_token)
    cfg = dict(imp.config, mask_token_id=plan.token_id)
    if plan.add:
        cfg["vocab_size"] += 1
    config = model_config(cfg, imp.source)
    for note in imp.notes:
        warnings.warn(note, stacklevel=3)

    tensors = imp.read_tensors()
    if plan.add:
        tensors["encoder.embed_tokens.weight"] = _append_mean_row(tensors["encoder.embed_tokens.weight"])
        if not config.tie_word_embeddings:
            tensors["diffusion_head.weight"] = _append_mean_row(tensors["diffusion_head.weight"])
    if config.tie_word_embeddings:
        tensors["diffusion_head.weight"] = tensors["encoder.embed_tokens.weight"]
    with torch.device("meta"):
        model = TriModeLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced both parameters: tie them again
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    model = model.to(dtype).eval()
    model.tokenizer = _final_tokenizer(imp.tokenizer, plan)
    return model


def _final_tokenizer(tok: Tokenizer | None, plan: MaskPlan) -> Tokenizer | None:
    if tok is None:
        return None
    hf = tok.hf
    if plan.add:
        hf.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
        assert hf.token_to_id(MASK_TOKEN) == plan.token_id
    config = dict(tok.config)
    config["mask_token"] = hf.id_to_token(plan.token_id)
    return Tokenizer(hf, config)


def prepare_out(out, source: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.resolve() == Path(source).resolve():
        raise ConvertError(f"the output folder {out} is the source itself; choose another folder")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is a file; choose a folder for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out} already exists and is not empty; choose a new folder or pass --force "
                           "to replace it")
    return out
