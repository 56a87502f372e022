"""The two set-up commands a newcomer reads in the README are the ones CI and users actually run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert ci == ["make test"]
    assert "make test" in readme_commands()


def test_make_test_builds_its_own_environment():
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:.*\$\(STAMP\)", mk, flags=re.M), "make test must depend on the install stamp"
    assert "-m venv" in mk and "pip install" in mk
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
