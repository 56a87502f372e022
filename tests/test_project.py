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
    # the exact versions CI installs are pinned in the constraints file the Makefile hands to pip
    assert "CONSTRAINTS := constraints.txt" in mk and "-c $(CONSTRAINTS)" in mk
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert any(re.fullmatch(r"torch==2\.13\.0(\+cpu)?", p.strip()) for p in pins)
