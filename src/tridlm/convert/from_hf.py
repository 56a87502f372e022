"""Import a Hugging Face folder of a Llama-family model (Llama, Mistral): config.json + safetensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..tokenizer import Tokenizer
from .common import ConvertError, Imported

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# model types whose layers carry biases that tridlm's model cannot hold
_BIASED_MODEL_TYPES = {"qwen2": "q/k/v projection biases", "qwen2_moe": "q/k/v projection biases"}
_ROPE_KEYS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "llama_4_scaling_beta", "attention_factor", "truncate"}
_NAME_RE = re.compile(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\.\S+)")
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # recomputed, never loaded
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def tridlm_name(hf_name: str) -> str | None:
    if hf_name == "lm_head.weight":
        return "diffusion_head.weight"
    m = _NAME_RE.fullmatch(hf_name)
    return f"encoder.{m.group(1)}" if m else None


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (f"; it holds {ggufs[0]}: pass that file instead" if len(ggufs) == 1
                else "; point convert at a Hugging Face model folder (config.json + *.safetensors) or a .gguf file")
        raise ConvertError(f"{path} has no config.json{hint}")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ConvertError(f"{cfg_file} is not valid JSON ({e})") from None


def _rope(hf: dict, source: Path, max_pos: int) -> dict:
    """Map rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x) to ours, refusing what we lack."""
    if isinstance(hf.get("rope_parameters"), dict):
        rope = dict(hf["rope_parameters"])
    else:
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope["rope_type"]
    if kind not in ("default", "linear", "yarn"):
        raise ConvertError(f"{source}: RoPE scaling {kind!r} is not supported (tridlm supports default, linear "
                           "and yarn); the converted model would put tokens at the wrong positions")
    unknown = sorted(k for k, v in rope.items() if k not in _ROPE_KEYS and v is not None)
    if unknown:
        raise ConvertError(f"{source}: RoPE setting(s) {', '.join(unknown)} are not supported by tridlm")
    if rope.pop("attention_factor", None) is not None:
        raise ConvertError(f"{source}: an explicit RoPE attention_factor is not supported by tridlm (it derives "
                           "the factor from mscale)")
    if rope.pop("truncate", True) is not True:
        raise ConvertError(f"{source}: YaRN with truncate=false is not supported by tridlm")
    if kind == "yarn":
        orig = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos
        rope["original_max_position_embeddings"] = int(orig)
        if rope.get("factor") is None:
            rope["factor"] = max_pos / orig
    if kind == "linear" and rope.get("factor") is None:
        raise ConvertError(f"{source}: linear RoPE scaling without a factor")
    return {k: v for k, v in rope.items() if v is not None}


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ConvertError(f"{index} names {missing[0]}, which is missing from {path}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ConvertError(f"{path} holds only pickle weights ({', '.join(pickles)}); tridlm never unpickles "
                           "(it can run arbitrary code). Re-save the model with save_pretrained(..., "
                           "safe_serialization=True)")
    raise ConvertError(f"{path} has no *.safetensors weights")


def _tokenizer(path: Path, notes: list[str]) -> Tokenizer | None:
    if not (path / "tokenizer.json").is_file():
        notes.append(f"{path} has no tokenizer.json; the checkpoint will have no tokenizer (token ids only)")
        return None
    tok = Tokenizer.from_folder(path)
    keep = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "chat_template")
    config = {k: tok.config[k] for k in keep if tok.config.get(k) is not None}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return Tokenizer(tok.hf, config)


def inspect_hf_folder(path) -> Imported:
    """Read config.json and the safetensors headers; refuse anything tridlm cannot represent."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if not path.is_dir():
        raise ConvertError(f"{path} is neither a folder nor a GGUF file")
    hf = _read_config(path)
    model_type = hf.get("model_type")
    if model_type in _BIASED_MODEL_TYPES:
        raise ConvertError(f"{path}: {model_type} models have {_BIASED_MODEL_TYPES[model_type]}, which "
                           "tridlm's model does not have; dropping them would change the model's outputs, so "
                           "this model cannot be converted")
    if model_type == "nemotron_labs_diffusion":
        raise ConvertError(f"{path} is already a tri-mode checkpoint; load it with tridlm.load instead of "
                           "converting it")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"{path}: model_type {model_type!r} is not supported; tridlm convert imports "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConvertError(f"{path}: config.json sets {flag}=true; tridlm's model has no biases and "
                               "dropping them would change the model's outputs")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{path}: activation {act!r} is not supported (tridlm's MLP uses silu)")

    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ConvertError(f"{path / 'config.json'} lacks {', '.join(missing)}; is it a Llama-family config?")

    notes: list[str] = []
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and window < max_pos:
        notes.append(f"{path} uses sliding-window attention ({window} tokens), which tridlm lacks; the "
                     f"context is capped at {window} tokens, where the two agree exactly")
        max_pos = int(window)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    config = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_pos,
        rope_parameters=_rope(hf, path, max_pos),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
        pad_token_id=hf.get("pad_token_id"),
    )

    located: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if _IGNORED.fullmatch(key):
                    continue
                if key.endswith(".bias"):
                    raise ConvertError(f"{path}: tensor {key} is a bias; tridlm's model has no biases and "
                                       "dropping them would change the model's outputs")
                name = tridlm_name(key)
                if name is None:
                    raise ConvertError(f"{path}: unexpected tensor {key} in {f.name}; tridlm's model has no "
                                       "place for it")
                located[name] = (f, key)
                shapes[name] = tuple(st.get_slice(key).get_shape())
    if config["tie_word_embeddings"]:
        # some tied checkpoints store the head anyway; it is the embedding, so drop the copy
        located.pop("diffusion_head.weight", None)
        shapes.pop("diffusion_head.weight", None)

    def read_tensors() -> dict[str, torch.Tensor]:
        out = {}
        by_file: dict[Path, list[str]] = {}
        for name, (f, _) in located.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for name in names:
                    out[name] = st.get_tensor(located[name][1]).to(torch.float32)
        return out

    return Imported(source=path, kind="hf", config=config, tokenizer=_tokenizer(path, notes), shapes=shapes,
                    read_tensors=read_tensors, notes=notes)
