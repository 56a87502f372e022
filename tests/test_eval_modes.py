"""Every mode on a fixed prompt set (tridlm.eval.modes) with a tiny random model: the batched runs give
each row what it gets alone, the lossless modes equal AR, the table has every column."""

import json

import pytest
import torch
from conftest import tiny_text_model

from tridlm import lora
from tridlm.bench.prompts import load_prompts
from tridlm.eval import modes
from tridlm.machine import machine_info

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, base = tiny_text_model(), tiny_text_model()  # the same weights; only `model` gets a drafter
    torch.manual_seed(1)
    lora.attach(model, rank=2, alpha=4.0)
    with torch.no_grad():  # a drafter that changes the drafts (a fresh one starts at zero)
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.5)
    return model.eval(), base


def test_every_mode_on_a_set(tiny):
    model, base = tiny
    prompts = load_prompts("gsm8k:3,stories:2")
    runs = modes.default_runs(block_length=4, quadratic_block_length=2)
    results = modes.evaluate_modes(model, base, prompts, runs, max_new_tokens=8, batch_size=3, speed_per_kind=1,
                                   repeats=1, log=lambda m: None)
    by = {r.run.label: r for r in results}
    ar, spec, quad, diff, bare = (by[r.label] for r in runs)
    assert all(r.speed_matches_batched for r in results)  # a row's output does not depend on its batch
    assert ar.tpf == 1.0 and ar.speedup_vs_ar == 1.0 and ar.quality["identical_to_ar"] == len(prompts)
    for lossless in (spec, quad, bare):  # greedy self-speculation and the drafter-free base: AR's text
        assert lossless.quality["identical_to_ar"] == len(prompts)
        assert lossless.quality["ar_nll"] == pytest.approx(ar.quality["ar_nll"])
    assert spec.acceptance is not None and 1 <= spec.acceptance <= 5
    assert diff.acceptance is None and diff.tpf >= 1
    assert ar.quality["gsm8k_graded"] == 3 and 0 <= ar.quality["gsm8k_accuracy"] <= 1
    meta = {**machine_info("cpu"), "dtype": "float32", "max_new_tokens": 8}
    md = modes.markdown(results, prompts, "tridlm eval modes x", "tiny", meta)
    assert md.count("\n| ") == len(runs) + 1 and "identical to AR" in md and "3 gsm8k, 2 story" in md
    json.dumps([r.to_dict() for r in results])


def test_speed_subset_takes_the_first_of_each_kind():
    prompts = load_prompts("gsm8k:3,humaneval:2,stories:2")
    idx = modes.speed_subset(prompts, 1)
    assert [prompts[i].kind for i in idx] == ["gsm8k", "humaneval", "story"]
    assert [prompts[i].id for i in idx] == ["gsm8k/0", "HumanEval/0", "story/0"]


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "poems"], "unknown prompt set"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--threshold", "1.5"], "--threshold must lie in"),
    (["--speed-per-kind", "-1"], "--speed-per-kind must be >= 0"),
])
def test_modes_command_refuses_bad_options_before_loading(argv, message, tmp_path, capsys):
    from tridlm.cli import main

    # the model folder does not exist: an option error must come first, before any loading
    assert main(["eval", "modes", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
