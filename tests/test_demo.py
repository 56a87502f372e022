"""`tridlm demo` end to end on a small trained checkpoint: every mode answers, the table adds up."""

from __future__ import annotations

import json

from tridlm.cli import main


def test_demo_runs_every_mode_and_reports(tiny_trained, tmp_path, capsys):
    _, _, folder = tiny_trained
    out = tmp_path / "demo.json"
    assert main(["demo", "--model", str(folder), "--max-new-tokens", "12", "--block-length", "4",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for mode in ("ar", "diffusion", "spec", "spec-quadratic"):
        assert f"=== mode: {mode}" in text
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["ar"]["tokens_per_forward"] == 1.0
    assert s["spec"]["identical_to_ar"] is True and s["spec-quadratic"]["identical_to_ar"] is True
    assert s["diffusion"]["identical_to_ar"] is None
    assert len(data["answers"]) == 4 * 3
    for mode, row in s.items():
        per_prompt = [a["metrics"]["generated_tokens"] for a in data["answers"] if a["mode"] == mode]
        assert row["generated_tokens"] == sum(per_prompt)
    assert "| spec " in text and "identical to AR" in text


def test_demo_rejects_unknown_mode(capsys):
    assert main(["demo", "--modes", "ar,turbo"]) == 2
    assert "unknown mode 'turbo'" in capsys.readouterr().err
