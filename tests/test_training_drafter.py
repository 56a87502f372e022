"""Training a LoRA drafter: the base (every causal pass) is frozen, only draft predictions learn;
self-distillation pulls drafts toward the causal verifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tridlm
from tridlm import lora
from tridlm.training import distributed
from tridlm.training.objective import self_distillation_sum
from tridlm.training.quick import micro_recipe, write_micro_corpus
from tridlm.training.recipe import RecipeError, load_recipe
from tridlm.training.trainer import Trainer, train


def test_self_distillation_sum_by_hand():
    g = torch.Generator().manual_seed(0)
    diff, ar = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    masked = torch.tensor([[True, True, False, True], [False, False, True, False]])
    expected = 0.0
    for b in range(2):
        for i in range(4):
            if masked[b, i] and i >= 1:  # teacher: causal logit i-1 (it predicts token i)
                p = F.softmax(ar[b, i - 1], -1)
                q = F.softmax(diff[b, i], -1)
                expected += float((p * (p.log() - q.log())).sum())
    assert float(self_distillation_sum(diff, ar, masked)) == pytest.approx(expected, rel=1e-5)


def test_drafter_trains_only_the_adapter(tmp_path):
    corpus = write_micro_corpus(tmp_path / "corpus")
    base = train(load_recipe(base=micro_recipe(corpus, tmp_path / "base"),
                             overrides={"train.steps": 2, "eval.every": 0, "checkpoint.every": 0}))
    res = train(load_recipe(base=micro_recipe(corpus, tmp_path / "drafter"), overrides={
        "init_from": str(base.final_model), "drafter.rank": 4, "objective.distill": 1.0, "train.steps": 3,
        "train.lr": 1e-2, "eval.every": 3, "checkpoint.every": 0}))
    before, after = tridlm.load(base.final_model), tridlm.load(res.final_model)
    assert (res.final_model / "linear_spec_lora" / "adapter_model.safetensors").is_file()
    assert after.draft_adapter is not None and after.draft_adapter["r"] == 4
    sd_before = before.state_dict()
    for name, t in after.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(t, sd_before[name]), name  # the base never moves
    ids = torch.randint(0, before.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(after(ids), before(ids))  # causal (AR) logits: exactly the base model
        assert (after(ids, pattern="block") - before(ids, pattern="block")).abs().max() > 0  # drafts learned
    vals = [r for r in res.history if r["kind"] == "val"]
    assert vals[0]["ar_loss"] == vals[-1]["ar_loss"]  # AR quality is untouched, to the last bit
    trains = [r for r in res.history if r["kind"] == "train"]
    assert all(r["distill_kl"] > 0 for r in trains)


def test_drafter_init_continues_a_trained_adapter(tmp_path):
    corpus = write_micro_corpus(tmp_path / "corpus")
    base = train(load_recipe(base=micro_recipe(corpus, tmp_path / "base"),
                             overrides={"train.steps": 2, "eval.every": 0, "checkpoint.every": 0}))
    first = train(load_recipe(base=micro_recipe(corpus, tmp_path / "first"), overrides={
        "init_from": str(base.final_model), "drafter.rank": 4, "train.steps": 2, "train.lr": 1e-2,
        "eval.every": 0, "checkpoint.every": 0}))
    adapter = first.final_model / "linear_spec_lora"
    # the continued run's drafter starts as the adapter it names, tensor for tensor
    trainer = Trainer(load_recipe(base=micro_recipe(corpus, tmp_path / "second"), overrides={
        "init_from": str(base.final_model), "drafter.rank": 4, "drafter.init": str(adapter)}))
    try:
        trainer.setup()
        got = {k: v.detach().cpu() for k, v in lora.lora_parameters(trainer.model).items()}
    finally:
        distributed.teardown(trainer.d)
    want = lora.lora_parameters(tridlm.load(first.final_model))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert any(want[k].abs().max() > 0 for k in want if "lora_B" in k)  # a trained adapter, not a fresh one


def test_drafter_init_with_another_rank_is_refused_before_training(tmp_path):
    corpus = write_micro_corpus(tmp_path / "corpus")
    base = train(load_recipe(base=micro_recipe(corpus, tmp_path / "base"),
                             overrides={"train.steps": 1, "eval.every": 0, "checkpoint.every": 0}))
    first = train(load_recipe(base=micro_recipe(corpus, tmp_path / "first"), overrides={
        "init_from": str(base.final_model), "drafter.rank": 4, "train.steps": 1, "eval.every": 0,
        "checkpoint.every": 0}))
    out = tmp_path / "second"
    with pytest.raises(RecipeError, match=r"drafter.init.*rank is 4.*drafter.rank: 4"):
        train(load_recipe(base=micro_recipe(corpus, out), overrides={
            "init_from": str(base.final_model), "drafter.rank": 8,
            "drafter.init": str(first.final_model / "linear_spec_lora"), "train.steps": 1}))
    assert not (out / "model").exists()
    with pytest.raises(RecipeError, match="drafter.init"):
        train(load_recipe(base=micro_recipe(corpus, out), overrides={
            "init_from": str(base.final_model), "drafter.rank": 4, "drafter.init": str(tmp_path / "nope")}))
