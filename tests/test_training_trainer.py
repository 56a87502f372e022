"""The trainer in one process: normalisation over accumulation, outputs, checkpoints, continued training, SFT."""

from __future__ import annotations

import json

import pytest
import torch

import tridlm
from tridlm.training.metrics import read_metrics
from tridlm.training.quick import micro_recipe, write_micro_corpus
from tridlm.training.recipe import load_recipe
from tridlm.training.schedule import lr_at
from tridlm.training.state import TRAINER_STATE, list_checkpoints
from tridlm.training.trainer import train

LOSS_KEYS = ("loss", "ar_loss", "diff_loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_micro_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    result = train(load_recipe(base=micro_recipe(corpus, out), overrides={"log.plot": True}))
    return result


def _train_losses(records):
    return [{k: r[k] for k in LOSS_KEYS} for r in records if r["kind"] == "train"]


def test_run_outputs(base_run):
    out = base_run.out_dir
    recs = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 9))
    assert all(r["ar_loss"] > 0 and r["diff_loss"] > 0 and r["tok_per_s"] > 0 for r in train_recs)
    assert [r["step"] for r in recs if r["kind"] == "val"] == [0, 4, 8]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # checkpoints every 4 steps, the last 2 kept; each opens with tridlm.load; state loads without pickles
    ckpts = list_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 8]
    for _, folder in ckpts:
        model = tridlm.load(folder)
        assert model.tokenizer is not None and model.tokenizer.mask_id == model.config.mask_token_id
        state = torch.load(folder / TRAINER_STATE, weights_only=True)
        assert state["samples_seen"] == 8 * state["step"]
    final = tridlm.load(base_run.final_model)
    last = tridlm.load(ckpts[-1][1])
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), last.state_dict().values(), strict=True))
    assert json.loads((out / "recipe.json").read_text())["train"]["steps"] == 8


def test_accumulation_gives_the_same_steps_as_one_big_batch(corpus, base_run, tmp_path):
    # global batch 8 as 2 micro-batches of 4 (base_run) or as one of 8: the global normalisation makes them equal
    one = train(load_recipe(base=micro_recipe(corpus, tmp_path), overrides={"train.micro_batch": 8}))
    a, b = _train_losses(base_run.history), _train_losses(one.history)
    for ra, rb in zip(a, b, strict=True):
        for k in LOSS_KEYS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), k


def test_continued_training_and_ar_only_stage(corpus, base_run, tmp_path):
    r = load_recipe(base=micro_recipe(corpus, tmp_path), overrides={
        "init_from": str(base_run.final_model), "objective.alpha": 0, "train.steps": 2, "eval.every": 0,
        "checkpoint.every": 0})
    res = train(r)
    recs = res.history
    train_recs = [x for x in recs if x["kind"] == "train"]
    assert all(x["diff_loss"] is None and x["loss"] == x["ar_loss"] for x in train_recs)
    start = [x for x in recs if x["kind"] == "val"][0]
    base_end = [x for x in base_run.history if x["kind"] == "val"][-1]
    assert start["ar_loss"] == pytest.approx(base_end["ar_loss"], rel=1e-6)  # it starts from the checkpoint
    assert start["diff_loss"] is not None  # validation still reports the diffusion loss


def test_sft_on_chats_scores_answers_only(base_run, tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
            for i in range(40)]
    chats.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = load_recipe(base=micro_recipe(chats, tmp_path / "sft"), overrides={
        "init_from": str(base_run.final_model), "data.sources": f"[gsm8k:{chats}]", "data.seq_len": 64,
        "train.steps": 3, "eval.every": 0, "checkpoint.every": 0})
    res = train(r)
    recs = [x for x in res.history if x["kind"] == "train"]
    assert len(recs) == 3 and all(x["diff_loss"] is not None for x in recs)
    model = tridlm.load(res.final_model)
    assert model.tokenizer.chat_template  # the checkpoint's tokenizer, template included


def test_schedules():
    kw = dict(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="wsd", decay_fraction=0.2, **kw) == 1.0
    assert lr_at(89, schedule="wsd", decay_fraction=0.2, **kw) == pytest.approx(0.55)
    assert lr_at(99, schedule="wsd", decay_fraction=0.2, **kw) == pytest.approx(0.1)
    assert lr_at(99, schedule="constant", **kw) == 1.0
