"""Import a Llama-architecture GGUF file (llama.cpp's format): settings, weights and tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .common import ConvertError, Imported
from .gguf_tokenizer import check_tokenizer_fields, tokenizer_from_gguf

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {"token_embd.weight": "encoder.embed_tokens.weight",
                 "output_norm.weight": "encoder.norm.weight",
                 "output.weight": "diffusion_head.weight"}
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # a value type this gguf version cannot decode; we never need those
            continue
    return meta


def tridlm_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"encoder.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) to get the half-split layout."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _config(meta: dict, arch: str, source: Path, tied: bool, vocab_rows: int) -> dict:
    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ConvertError(f"{source}: metadata {full} is missing; the file is incomplete")
            return default
        value = meta[full]
        if isinstance(value, list):
            raise ConvertError(f"{source}: {full} varies per layer, which tridlm's model does not support")
        return value

    if get("expert_count", 0):
        raise ConvertError(f"{source} is a mixture-of-experts model ({arch}.expert_count = "
                           f"{get('expert_count')}); tridlm convert imports dense Llama-family models only")
    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConvertError(f"{source}: key and value head sizes differ, which tridlm's model does not support")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ConvertError(f"{source}: RoPE covers {get('rope.dimension_count')} of {head_dim} head dimensions "
                           "(partial rotary), which tridlm's model does not support")
    max_pos = int(get("context_length", 2048))
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    handled = {"type", "factor", "original_context_length", "yarn_beta_fast", "yarn_beta_slow", "finetuned"}
    unknown = sorted(k for k in meta if k.startswith(f"{arch}.rope.scaling.")
                     and k.removeprefix(f"{arch}.rope.scaling.") not in handled)
    if unknown:
        raise ConvertError(f"{source}: RoPE setting(s) {', '.join(unknown)} are not supported by tridlm")
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(get("rope.scaling.factor", 1.0)))
    elif scaling == "yarn":
        rope.update(rope_type="yarn", factor=float(get("rope.scaling.factor", 1.0)),
                    original_max_position_embeddings=int(get("rope.scaling.original_context_length", max_pos)))
        for ours in ("beta_fast", "beta_slow"):
            if get(f"rope.scaling.yarn_{ours}") is not None:
                rope[ours] = float(get(f"rope.scaling.yarn_{ours}"))
    elif scaling != "none":
        raise ConvertError(f"{source}: RoPE scaling {scaling!r} is not supported (tridlm supports none, linear "
                           "and yarn)")
    return dict(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=max_pos,
        rope_parameters=rope,
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def inspect_gguf(path) -> Imported:
    """Read a GGUF's metadata and tensor headers; refuse anything tridlm cannot represent."""
    import gguf
    from gguf.quants import _type_traits

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if not is_gguf(path):
        raise ConvertError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt files fail inside the reader in many ways
        raise ConvertError(f"{path} could not be read as GGUF ({e}); is the file complete?") from None
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{path}: GGUF architecture {arch!r} is not supported; tridlm convert imports "
                           "Llama-family models (general.architecture 'llama')")
    check_tokenizer_fields(meta, path)

    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *_type_traits}
    tensors, shapes = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".bias"):
            raise ConvertError(f"{path}: tensor {t.name} is a bias; tridlm's model has no biases and dropping "
                               "them would change the model's outputs")
        if t.name == "rope_freqs.weight":
            raise ConvertError(f"{path}: the file carries per-frequency RoPE factors (rope_freqs.weight, Llama-3 "
                               "style scaling), which tridlm does not support")
        name = tridlm_name(t.name)
        if name is None:
            raise ConvertError(f"{path}: unexpected tensor {t.name}; tridlm's model has no place for it")
        if t.tensor_type not in readable:
            raise ConvertError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the installed "
                               "gguf package cannot dequantize; use a file quantized with another type")
        tensors[name] = t
        shapes[name] = tuple(int(n) for n in reversed(t.shape.tolist()))

    if "encoder.embed_tokens.weight" not in shapes:
        raise ConvertError(f"{path}: no token_embd.weight tensor; the file is incomplete")
    config = _config(meta, arch, path, tied="diffusion_head.weight" not in shapes,
                     vocab_rows=shapes["encoder.embed_tokens.weight"][0])
    tokenizer = tokenizer_from_gguf(meta, path)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def read_tensors() -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape(shapes[name])
            if name.endswith("q_proj.weight"):
                w = unpermute_rows(w, heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_rows(w, kv_heads)
            if not (w.flags.writeable and w.flags.c_contiguous):  # float32 tensors are views of the mmap
                w = np.array(w)
            out[name] = torch.from_numpy(w)
        return out

    return Imported(source=path, kind="gguf", config=config, tokenizer=tokenizer, shapes=shapes,
                    read_tensors=read_tensors)
