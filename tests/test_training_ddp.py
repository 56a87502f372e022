"""torchrun with 2 CPU processes (gloo) follows the 1-process loss curve for the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
import yaml

from tridlm.training.metrics import read_metrics
from tridlm.training.quick import micro_recipe, write_micro_corpus
from tridlm.training.recipe import load_recipe
from tridlm.training.trainer import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

KEYS = ("loss", "ar_loss", "diff_loss", "grad_norm")


def _recipe(corpus, out):
    r = micro_recipe(corpus, out)
    r["train"]["steps"] = 6
    r["eval"] = {"every": 3, "sequences": 8}
    r["checkpoint"] = {"every": 3, "keep": 1}
    return r


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    corpus = write_micro_corpus(tmp / "corpus")
    # one process: global batch 8 as two accumulated micro-batches of 4
    result = train(load_recipe(base=_recipe(corpus, tmp / "one")))
    return tmp, corpus, result


def _torchrun(tmp, corpus, name, *overrides):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_recipe(corpus, tmp / name)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tridlm", "train", str(path), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp / name / "metrics.jsonl")


def _assert_same_curve(one, two):
    a = [r for r in one if r["kind"] in ("train", "val")]
    b = [r for r in two if r["kind"] in ("train", "val")]
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in KEYS:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (ra["kind"], ra["step"], k)


def test_two_processes_ddp_match_one_process(single):
    tmp, corpus, one = single
    # two processes: each rank one micro-batch of 4 per step, the same global batch of 8
    two = _torchrun(tmp, corpus, "ddp")
    _assert_same_curve(one.history, two)


def test_fsdp_is_a_recipe_switch(single):
    tmp, corpus, one = single
    two = _torchrun(tmp, corpus, "fsdp", "--train.parallel", "fsdp")
    _assert_same_curve(one.history, two)
    import tridlm

    assert tridlm.load(tmp / "fsdp" / "model").config.num_hidden_layers == 2  # full weights gathered on save
