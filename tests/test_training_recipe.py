"""Recipes: file formats, command-line overrides, and the errors raised before training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from tridlm.cli import main
from tridlm.training.corpora import DataError
from tridlm.training.quick import TINY_RECIPE, micro_recipe, write_micro_corpus
from tridlm.training.recipe import Recipe, RecipeError, load_recipe, parse_overrides
from tridlm.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_yaml_and_toml_recipes_with_overrides(tmp_path):
    y = _write(tmp_path, {"seed": 3, "train": {"lr": "3e-4", "steps": 10}, "data": {"sources": "shakespeare"}})
    r = load_recipe(y, ["--train.steps", "20", "--objective.alpha=0", "--data.sources", "[stdlib, shakespeare]"])
    assert isinstance(r, Recipe)
    assert (r.seed, r.train.lr, r.train.steps, r.objective.alpha) == (3, 3e-4, 20, 0.0)
    assert r.data.sources == ["stdlib", "shakespeare"]
    t = tmp_path / "r.toml"
    t.write_text('seed = 4\n[train]\nschedule = "wsd"\nmicro_batch = 4\nglobal_batch = 8\n')
    r = load_recipe(t, {"train.precision": "bf16"})
    assert (r.seed, r.train.schedule, r.train.precision, r.train.global_batch) == (4, "wsd", "bf16", 8)


def test_override_syntax():
    assert parse_overrides(["--a.b", "1", "--c=x y"]) == {"a.b": "1", "c": "x y"}
    with pytest.raises(RecipeError, match="has no value"):
        parse_overrides(["--train.steps"])


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train\.stpes'"):
        load_recipe(_write(tmp_path, {"train": {"stpes": 5}}))
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optimiser'"):
        load_recipe(None, {"optimiser.lr": "1"})


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe key 'train\.steps': expected int, got 'many'"):
        load_recipe(_write(tmp_path, {"train": {"steps": "many"}}))
    with pytest.raises(RecipeError, match=r"recipe key 'log\.progress': expected bool"):
        load_recipe(None, {"log.progress": "sometimes"})
    with pytest.raises(RecipeError, match=r"recipe key 'model': expected a mapping"):
        load_recipe(_write(tmp_path, {"model": 3}))
    with pytest.raises(RecipeError, match=r"recipe key 'train\.schedule'"):
        load_recipe(None, {"train.schedule": "linear"})


def test_missing_data_file_is_named_before_training(tmp_path):
    r = load_recipe(base=micro_recipe(tmp_path / "no-such-corpus", tmp_path / "run"))
    with pytest.raises(DataError, match=r"data file .*no-such-corpus.* does not exist"):
        Trainer(r).setup()
    assert not (tmp_path / "run").exists()  # nothing was built


def _tokenizer_without_mask(folder: Path) -> Path:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["to be or not to be"] * 10,
                           trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       show_progress=False))
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_tokenizer_without_mask_token_is_named(tmp_path):
    tok = _tokenizer_without_mask(tmp_path / "tok")
    data = write_micro_corpus(tmp_path / "data", files=2, chars_per_file=500)
    r = load_recipe(base=micro_recipe(data, tmp_path / "run"), overrides={"tokenizer.path": str(tok)})
    with pytest.raises(RecipeError, match=r"tokenizer .*tok/tokenizer\.json has no mask token"):
        Trainer(r).setup()
    assert not (tmp_path / "run").exists()


def test_global_batch_must_split_evenly(tmp_path):
    r = load_recipe(base=micro_recipe(tmp_path, tmp_path / "run"), overrides={"train.global_batch": 6})
    with pytest.raises(RecipeError, match=r"'train\.global_batch' \(6\) must be a multiple"):
        Trainer(r).setup()


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    y = _write(tmp_path, {"train": {"steps": 1}})
    assert main(["train", str(y), "--train.stpes", "3"]) == 2
    err = capsys.readouterr().err
    assert "tridlm train: error: unknown recipe key 'train.stpes'" in err
    assert main(["train", str(y), "--data.sources", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file" in capsys.readouterr().err


def test_shipped_tiny_recipe_is_the_quick_recipe():
    shipped = yaml.safe_load((ROOT / "recipes" / "tiny-shakespeare.yaml").read_text())
    shipped.pop("out_dir")
    assert load_recipe(base=shipped).to_dict() == load_recipe(base=TINY_RECIPE).to_dict()
    for name in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(name)  # every shipped recipe is valid


def test_overrides_leave_the_base_dict_alone():
    base = {"train": {"steps": 5}, "eval": {"every": 7}}
    load_recipe(base=base, overrides={"train.steps": 9, "eval.every": 0})
    assert base == {"train": {"steps": 5}, "eval": {"every": 7}}
