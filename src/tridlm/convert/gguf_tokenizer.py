"""Rebuild a `tokenizers` byte-level BPE tokenizer from the metadata inside a GGUF file.

llama.cpp stores the vocabulary, the merges, each token's type and the name of the pre-tokenizer
(`tokenizer.ggml.pre`); the pre-tokenizer's regex lives in llama.cpp's code, so only the names
whose splitting we reproduce exactly are accepted.
"""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..tokenizer import Tokenizer
from .common import ConvertError

# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4

_SPECIAL_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                 "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}

# pre-tokenizer name -> whether digits are split one per token before the GPT-2 regex
_PRE_TOKENIZERS = {"gpt-2": False, "smollm": True, "starcoder": True, "refact": True}


def _byte_level(split_digits: bool):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def check_tokenizer_fields(meta: dict, source) -> None:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ConvertError(f"{source} carries no tokenizer (no tokenizer.ggml.model); tridlm convert needs one")
    if model != "gpt2":
        raise ConvertError(f"{source}: tokenizer type {model!r} is not supported; tridlm convert rebuilds "
                           "byte-level BPE ('gpt2') tokenizers from GGUF. Convert the model's Hugging Face "
                           "folder (with its tokenizer.json) instead")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ConvertError(f"{source}: pre-tokenizer {pre!r} is not supported (known: "
                           f"{', '.join(sorted(_PRE_TOKENIZERS))}); convert the model's Hugging Face folder "
                           "(with its tokenizer.json) instead")


def tokenizer_from_gguf(meta: dict, source) -> Tokenizer:
    """`meta`: GGUF key -> value (strings and lists already decoded)."""
    check_tokenizer_fields(meta, source)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConvertError(f"{source}: the vocabulary lists some token twice; the file is corrupt")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = _byte_level(_PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")])
    hf.decoder = decoders.ByteLevel()
    # tokens already in the vocabulary keep their ids when registered as added tokens
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == _CONTROL])
    hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == _USER_DEFINED])

    config = {}
    for key, gguf_key in _SPECIAL_KEYS.items():
        i = meta.get(gguf_key)
        if i is not None and 0 <= i < len(tokens):
            config[key] = tokens[i]
    if meta.get("tokenizer.ggml.add_bos_token") and "bos_token" in config:
        bos = config["bos_token"]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return Tokenizer(hf, config)
