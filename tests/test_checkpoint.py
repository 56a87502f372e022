"""Checkpoint folders: exact round trips, sharding, atomic saves, and loud, specific load errors."""

import json
import pickle

import pytest
import torch
from conftest import random_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

import tridlm
from tridlm import CheckpointError, Tokenizer
from tridlm import checkpoint as ckpt


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_bit_identical(tmp_path, tied):
    model = random_model(seed=7, tie_word_embeddings=tied)
    model.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_labs_diffusion" and cfg["architectures"] == ["NemotronLabsDiffusionModel"]
    loaded = tridlm.load(tmp_path / "m")
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert (loaded.diffusion_head.weight is loaded.encoder.embed_tokens.weight) == tied


def test_sharded_save_has_index_and_loads(tmp_path):
    model = random_model(seed=8)
    model.save(tmp_path / "m", max_shard_bytes=20_000)
    idx = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = set(idx["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "m" / s).is_file() for s in shards)
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(logits(model, ids), logits(tridlm.load(tmp_path / "m"), ids))


def test_atomic_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = random_model(seed=9)
    model.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        random_model(seed=10).save(tmp_path / "m")
    with pytest.raises(OSError):
        random_model(seed=10).save(tmp_path / "new")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_truncated_file_is_named(tmp_path):
    random_model().save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        tridlm.load(tmp_path / "m")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    random_model().save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    sd["encoder.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.up_proj\.weight has shape \[65, 32\].*"
                                              r"implies \[64, 32\]"):
        tridlm.load(tmp_path / "m")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    random_model().save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(str(f))
    del sd["encoder.norm.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) encoder\.norm\.weight"):
        tridlm.load(tmp_path / "m")
    sd["encoder.norm.weight"] = torch.ones(32)
    sd["encoder.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) encoder\.layers\.0\.self_attn\.q_proj\.bias"):
        tridlm.load(tmp_path / "m")


def test_pickle_checkpoints_are_never_unpickled(tmp_path):
    random_model().save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / "m" / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*never unpickles"):
        tridlm.load(tmp_path / "m")
    # a pickle disguised under the safetensors name is recognised too
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="is a pickle file, not safetensors"):
        tridlm.load(tmp_path / "m")


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tridlm.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        tridlm.load(tmp_path / "empty")
    random_model().save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"]["rope_type"] = "longrope"
    cfg["a_field_from_the_future"] = 1  # ignored
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported rope_type 'longrope'"):
        tridlm.load(tmp_path / "m")
    cfg["rope_parameters"]["rope_type"] = "default"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    tridlm.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        tridlm.load(tmp_path / "m")


def make_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<|mask|>", "a", "b", "ab", "Ġ", "Ġa"])}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<s>", "</s>", "<|mask|>"])
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>", "mask_token": "<|mask|>",
                          "chat_template": template})


def test_tokenizer_round_trip_through_checkpoint(tmp_path):
    tok = make_tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.mask_id) == (1, 2, 3)
    model = random_model()
    model.save(tmp_path / "m", tokenizer=tok)
    loaded = tridlm.load(tmp_path / "m").tokenizer
    assert loaded.encode("ab a") == tok.encode("ab a") == [6, 8]
    assert loaded.decode([6, 8]) == "ab a"
    assert (loaded.bos_id, loaded.eos_id, loaded.mask_id) == (1, 2, 3)
    text = loaded.apply_chat_template([{"role": "user", "content": "ab"}])
    assert text == "<s>user\nab</s><s>assistant\n"


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    random_model().save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    pad = (0x80 - n % 256) % 256 or 256  # grow the header (trailing spaces are valid JSON) to end in 0x80
    header = data[8:8 + n] + b" " * pad
    f.write_bytes((n + pad).to_bytes(8, "little") + header + data[8 + n:])
    assert f.read_bytes()[0] == 0x80
    ids = torch.randint(0, 64, (1, 4))
    assert torch.equal(logits(tridlm.load(tmp_path / "m"), ids), logits(random_model(), ids))
