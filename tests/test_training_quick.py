"""The tiny model of the test session (about a minute of CPU training) learned in both modes."""

from __future__ import annotations

import math

from tridlm.training.metrics import read_metrics
from tridlm.training.quick import METRICS_FILE


def test_tiny_model_lowers_held_out_ar_and_diffusion_losses(tiny_trained):
    model, tokenizer, folder = tiny_trained
    vals = [r for r in read_metrics(folder / METRICS_FILE) if r["kind"] == "val"]
    first, last = vals[0], vals[-1]
    assert first["step"] == 0 and last["step"] > 0
    # at initialisation both are about log(vocab); the trained model is far below
    assert abs(first["ar_loss"] - math.log(model.config.vocab_size)) < 0.5
    assert last["ar_loss"] < first["ar_loss"] - 2.0
    assert last["diff_ce"] < first["diff_ce"] - 1.2
    assert last["diff_loss"] < 0.8 * first["diff_loss"]


def test_tiny_model_folder_is_a_complete_checkpoint(tiny_trained):
    model, tokenizer, folder = tiny_trained
    assert tokenizer.mask_id == model.config.mask_token_id
    assert tokenizer.eos_id == model.config.eos_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
