"""The infilling examples inside a training run (`objective.fim_rate` / `hole_rate`)."""

from __future__ import annotations

import math

import pytest

from tridlm.eval.fim_training import build_tokenizer, comparison_markdown
from tridlm.tokenizer import FIM_MIDDLE, FIM_PREFIX
from tridlm.training.fim import FimConfig
from tridlm.training.quick import micro_recipe, write_micro_corpus
from tridlm.training.recipe import load_recipe
from tridlm.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixed_batches_and_a_short_paired_run(tmp_path):
    data = write_micro_corpus(tmp_path / "data", files=4, chars_per_file=3000)
    tok = build_tokenizer(tmp_path / "tok", vocab_size=320, sources=[str(data)], val_fraction=0.25)
    pre, mid = tok.token_to_id(FIM_PREFIX), tok.token_to_id(FIM_MIDDLE)
    runs = {}
    for name, cfg in (("plain", FimConfig()), ("fim", FimConfig(fim_rate=1.0, hole_rate=1.0))):
        recipe = load_recipe(base=micro_recipe(data, tmp_path / name), overrides={
            "tokenizer.path": str(tmp_path / "tok"), "data.val_fraction": 0.25, "train.steps": 1, "eval.sequences": 4,
            "eval.every": 0, "checkpoint.every": 0, "objective.fim_rate": cfg.fim_rate,
            "objective.hole_rate": cfg.hole_rate})
        trainer = Trainer(recipe)
        trainer.setup()
        ids, lm, c = trainer._micro_batches(0)[0]
        has_fim = (ids == mid).any(1)
        assert bool(has_fim.all()) if name == "fim" else not bool(has_fim.any())
        if name == "fim":
            assert bool((ids == pre).any(1).all())
            bs = trainer.block_size
            for row in c.masked:  # hole noise: one contiguous masked run per block
                for s in range(0, row.numel(), bs):
                    blk = row[s:s + bs].int().tolist()
                    k = sum(blk)
                    assert k >= 1 and blk[blk.index(1):blk.index(1) + k] == [1] * k
        runs[name] = trainer.run()
    for r in runs.values():
        val = [h for h in r.history if h["kind"] == "val"][-1]
        assert math.isfinite(val["ar_loss"]) and math.isfinite(val["diff_loss"])
    md = comparison_markdown(tmp_path, 1.0, 1.0)
    assert "AR cross-entropy" in md and "relative change" in md


def test_fim_rate_without_fim_tokens_is_refused_before_training(tmp_path):
    from tridlm.training.recipe import RecipeError

    data = write_micro_corpus(tmp_path / "data", files=2, chars_per_file=2000)
    recipe = load_recipe(base=micro_recipe(data, tmp_path / "run"), overrides={
        "train.steps": 1, "eval.every": 0, "checkpoint.every": 0, "objective.fim_rate": 0.5,
        "data.val_fraction": 0})  # no held-out split: the refusal, not the split, is under test
    trainer = Trainer(recipe)
    with pytest.raises(RecipeError, match="fim_rate"):
        trainer.setup()
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()
