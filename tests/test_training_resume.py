"""Exact resume: a run killed with SIGKILL resumes from its last checkpoint and continues with the same losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from tridlm.training.metrics import read_metrics
from tridlm.training.quick import micro_recipe, write_micro_corpus
from tridlm.training.recipe import load_recipe
from tridlm.training.state import list_checkpoints
from tridlm.training.trainer import train

STEPS = 30


def _recipe_file(tmp_path, corpus, name):
    r = micro_recipe(corpus, tmp_path / name)
    r["train"]["steps"] = STEPS
    r["checkpoint"] = {"every": 5, "keep": 2}
    r["log"] = {"progress": False, "plot": False}
    r["eval"] = {"every": 10, "sequences": 8}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _train_cmd(recipe):
    return [sys.executable, "-m", "tridlm", "train", str(recipe)]


def _comparable(path):
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_metrics(path)]


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path):
    corpus = write_micro_corpus(tmp_path / "corpus")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the run to be killed: SIGKILL as soon as its first checkpoint exists, mid-run
    killed = _recipe_file(tmp_path, corpus, "killed")
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_root = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list_checkpoints(ckpt_root) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    step_at_kill = list_checkpoints(ckpt_root)[-1][0]
    assert step_at_kill < STEPS

    resumed = subprocess.run(_train_cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpt_root / f'step-{step_at_kill:08d}'}" in resumed.stdout

    # the uninterrupted run, in this process (the recipe fixes the thread count, so the arithmetic is the same)
    train(load_recipe(_recipe_file(tmp_path, corpus, "whole")))

    a, b = _comparable(tmp_path / "killed" / "metrics.jsonl"), _comparable(tmp_path / "whole" / "metrics.jsonl")
    assert len(a) == len(b) == STEPS + STEPS // 10 + 1
    assert a == b  # bit-for-bit: the same losses, gradient norms and validation numbers
