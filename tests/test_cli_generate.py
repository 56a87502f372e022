"""`tridlm generate` and `tridlm chat` end to end on a tiny checkpoint (random weights, BPE tokenizer)."""

from __future__ import annotations

import importlib
import io
import json

import pytest
import torch
from conftest import small_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import tridlm
from tridlm import TriModeLM
from tridlm.cli import main
from tridlm.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODES = ("ar", "diffusion", "spec", "spec-quadratic")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["To be, or not to be, that is the question. " * 20, "hello world " * 20], trainer)
    tok = Tokenizer(hf, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "mask_token": "<|mask|>",
                         "chat_template": CHATML})
    torch.manual_seed(0)
    config = small_config(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                          bos_token_id=tok.bos_id, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("cli_ckpt")
    TriModeLM(config).eval().save(folder, tokenizer=tok)
    return str(folder)


def run_cli(capsys, *argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


COMMON = ("--max-new-tokens", "12", "--block-length", "4", "--ignore-eos", "--device", "cpu")


@pytest.mark.parametrize("mode", MODES)
def test_generate_each_mode(checkpoint, capsys, mode):
    rc, out, err = run_cli(capsys, "generate", checkpoint, "To be", "--mode", mode, *COMMON, "--json")
    assert rc == 0, err
    res = json.loads(out)
    row = res["rows"][0]
    assert res["mode"] == mode and len(row["ids"]) == 12 and row["finish_reason"] == "length"
    m = res["metrics"]
    assert m["generated_tokens"] == 12 and m["prefill_forwards"] == 1 and m["forwards"] >= 1
    assert m["tokens_per_forward"] == pytest.approx(12 / m["forwards"])
    model = tridlm.load(checkpoint)
    want = model.generate("To be", mode, max_new_tokens=12, block_length=4, ignore_eos=True)
    assert row["ids"] == want.ids and row["text"] == want.text
    if mode in ("spec", "spec-quadratic"):  # lossless: the AR text
        assert row["ids"] == model.generate("To be", "ar", max_new_tokens=12, ignore_eos=True).ids
        assert sum(m["acceptance_length_histogram"].values()) >= 1


def test_generate_plain_stream_and_stdin(checkpoint, capsys, monkeypatch):
    rc, plain, err = run_cli(capsys, "generate", checkpoint, "hello", "--mode", "spec", *COMMON)
    assert rc == 0 and "[spec] 12 tokens" in err and "TPF" in err and "acceptance" in err
    rc, streamed, _ = run_cli(capsys, "generate", checkpoint, "--mode", "spec", "--stream", *COMMON,
                              stdin="hello", monkeypatch=monkeypatch)
    assert rc == 0 and streamed == plain
    rc, lines, _ = run_cli(capsys, "generate", checkpoint, "hello", "--mode", "diffusion", "--stream",
                           "--json", *COMMON)
    records = [json.loads(line) for line in lines.splitlines()]
    result = records[-1]
    assert "".join(r["text"] for r in records[:-1]) == result["rows"][0]["text"]
    assert [t for r in records[:-1] for t in r["ids"]] == result["rows"][0]["ids"]


def test_generate_sampling_options_and_stop(checkpoint, capsys):
    args = ("generate", checkpoint, "To be", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95",
            "--seed", "7", "--mode", "diffusion", "--threshold", "0.5", "--steps", "2",
            "--selection-policy", "margin", *COMMON, "--json")
    a = json.loads(run_cli(capsys, *args)[1])
    b = json.loads(run_cli(capsys, *args)[1])
    assert a["rows"][0]["ids"] == b["rows"][0]["ids"]
    assert max(int(k) for k in a["metrics"]["denoise_passes_histogram"]) <= 2  # JSON keys are strings
    text = a["rows"][0]["text"]
    stop = text[3:5]
    c = json.loads(run_cli(capsys, *args, "--stop", stop)[1])
    assert c["rows"][0]["finish_reason"] == "stop" and c["rows"][0]["text"] == text[:text.index(stop)]


@pytest.mark.parametrize("argv,message", [
    (("--mode", "beam"), "unknown mode 'beam'"),
    (("--block-length", "0"), "block_length must be an integer in [1, 1024]"),
    (("--threshold", "1.5"), "threshold must lie in [0, 1]"),
    (("--steps", "0"), "steps (denoise passes per block) must be an integer in [1, 1024]"),
    (("--selection-policy", "random"), "unknown selection_policy 'random'"),
])
def test_generate_validation_errors(checkpoint, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(tridlm.loader, "load", lambda *a, **k: pytest.fail("loaded the weights"))
    rc, out, err = run_cli(capsys, "generate", checkpoint, "hello", "--mode", "diffusion", *argv)
    assert rc == 2 and message in err and err.startswith("tridlm generate: error:") and out == ""


def test_generate_prompt_longer_than_context(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(TriModeLM, "forward", lambda *a, **k: pytest.fail("a forward ran"))
    rc, out, err = run_cli(capsys, "generate", checkpoint, "--mode", "spec", stdin="hello world " * 200,
                           monkeypatch=monkeypatch)
    assert rc == 2 and "longer than the context window (256 positions)" in err


def test_chat_uses_the_template_and_keeps_the_conversation(checkpoint, capsys, monkeypatch):
    gen = importlib.import_module("tridlm.generate")  # the module (tridlm.generate is also the function)
    prompts = []
    real = gen.generate

    def spy(model, prompt, *a, **k):
        prompts.append(prompt)
        return real(model, prompt, *a, **k)

    monkeypatch.setattr(gen, "generate", spy)
    stdin = "hello\n\n/reset\nTo be\nor not\n/exit\nignored\n"
    rc, out, err = run_cli(capsys, "chat", checkpoint, "--mode", "spec", "--max-new-tokens", "6", "--stats",
                           "--block-length", "3", "--device", "cpu", stdin=stdin, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert len(prompts) == 3 and err.count("[spec]") == 3 and out.endswith("\n")
    assert prompts[0] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[1] == "<|im_start|>user\nTo be<|im_end|>\n<|im_start|>assistant\n"  # after /reset
    assert prompts[2].startswith(prompts[1])  # the first exchange is kept
    assert prompts[2].endswith("<|im_start|>user\nor not<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("mode", ["diffusion", "spec"])
def test_the_default_block_length_is_the_checkpoints_block_size(checkpoint, tmp_path, capsys, mode):
    """A checkpoint trained at block 16 decodes at 16 unless told otherwise: through the Python API and
    the CLI, whose JSON says which block length ran; an explicit one still wins."""
    import shutil

    folder = tmp_path / "block16"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["block_size"] != 16
    (folder / "config.json").write_text(json.dumps({**config, "block_size": 16}))
    m = tridlm.load(folder)
    assert tridlm.generate(m, "hello", mode, max_new_tokens=20).block_length == 16
    assert tridlm.generate(m, "hello", mode, max_new_tokens=20, block_length=4).block_length == 4
    assert tridlm.generate(m, "hello", "ar", max_new_tokens=4).block_length is None
    rc, out, _ = run_cli(capsys, "generate", str(folder), "hello", "--mode", mode, "--json", "--max-new-tokens", "20")
    assert rc == 0 and json.loads(out)["block_length"] == 16
