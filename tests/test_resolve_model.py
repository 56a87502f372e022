"""One resolver for model names (tridlm.default_model.resolve_model / locate_model): every command gives
"default", "smollm2" and a checkpoint folder the same meaning, --no-draft-adapter included, and a bad name
fails with the fix before any weight loads. "default" is monkeypatched to a tiny saved checkpoint plus a
drafter of its own, "smollm2" to the same base: the real 135M model never loads here."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_text_model

import tridlm
from tridlm import default_model, lora
from tridlm.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory):
    """(base folder, drafter folder): a tiny text model and a LoRA drafter saved beside it."""
    root = tmp_path_factory.mktemp("tiny_default")
    model = tiny_text_model()
    model.save(root / "base")
    lora.attach(model, rank=2)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.02)  # a drafter that changes something (B = 0 would be a no-op)
    lora.save(model, root / "drafter")
    return root / "base", root / "drafter"


@pytest.fixture
def as_default(tiny_default, monkeypatch):
    import tridlm.convert

    base, drafter = tiny_default
    monkeypatch.setattr(default_model, "default_model_paths", lambda: (base, drafter))
    monkeypatch.setattr(tridlm.convert, "smollm2_base", lambda *a, **k: base)
    return base, drafter


def no_weights(monkeypatch):
    monkeypatch.setattr(tridlm.loader, "load", lambda *a, **k: pytest.fail("loaded the weights"))


def test_locate_model_names(as_default, tmp_path):
    base, drafter = as_default
    for name in (None, "default"):
        s = default_model.locate_model(name)
        assert (s.kind, s.folder, s.draft_adapter) == ("default", base, drafter)
        assert default_model.locate_model(name, draft_adapter=False).draft_adapter is False
    for name in ("smollm2", "smollm2-base"):
        for adapter in (True, False):  # the base has no drafter: asking for "its own" gives none
            s = default_model.locate_model(name, draft_adapter=adapter)
            assert (s.kind, s.folder, s.draft_adapter) == ("smollm2", base, False)
    s = default_model.locate_model(str(base))
    assert (s.kind, s.folder, s.draft_adapter) == ("checkpoint", base, True)
    assert default_model.locate_model(base, draft_adapter=drafter).draft_adapter == drafter


def test_draft_adapter_false_means_the_base_for_default_in_every_command(as_default):
    from tridlm.commands import generate, infill, serve

    base, _ = as_default
    reference = tridlm.load(base, draft_adapter=False)
    with_drafter = default_model.resolve_model("default")
    assert with_drafter.draft_adapter is not None
    argv = {"generate": ["generate", "default", "hi", "--device", "cpu"],
            "infill": ["infill", "default", "a<FILL>b", "--device", "cpu"],
            "serve": ["serve", "--device", "cpu"]}
    for flags, want in (([], with_drafter), (["--no-draft-adapter"], reference)):
        models = {"resolve_model": default_model.resolve_model("default", draft_adapter=not flags)}
        args = {k: build_parser().parse_args(v + flags) for k, v in argv.items()}
        models["generate"] = generate.load_model(args["generate"], generate.generation_params(args["generate"]))
        models["infill"] = infill.load_model(args["infill"])
        app, name = serve.build_app(args["serve"])
        models["serve"] = app.state.engine.model
        assert name == "tridlm-default"
        for where, m in models.items():
            assert (m.draft_adapter is None) == bool(flags), where
            got, ref = m.state_dict(), want.state_dict()
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), where


def test_infill_cli_accepts_no_draft_adapter_with_default(as_default, capsys):
    rc = main(["infill", "default", "--prefix", "Once upon", "--suffix", " the end.", "--length", "2",
               "--block-length", "4", "--device", "cpu", "--no-draft-adapter", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err  # it used to stop at "--no-draft-adapter: load the SmolLM2 base folder instead"
    assert '"fills"' in out.out


@pytest.mark.parametrize("command", [["generate", "{}", "hi"], ["infill", "{}", "a<FILL>b"], ["serve", "--model", "{}"],
                                     ["eval", "infill", "{}"], ["eval", "modes", "{}"], ["bench", "{}", "--quick"],
                                     ["demo", "--model", "{}"]])
def test_an_unknown_name_fails_clearly_before_loading(command, capsys, monkeypatch):
    no_weights(monkeypatch)
    rc = main([a.format("no-such-model") for a in command])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "no model 'no-such-model': no such folder, and not a model name" in err
    assert "'default'" in err and "'smollm2'" in err and "checkpoint folder" in err


def test_bad_folders_say_what_to_give(tmp_path, monkeypatch):
    no_weights(monkeypatch)
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2'"):
        default_model.resolve_model("smollm")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint folder; convert it first: tridlm convert"):
        default_model.resolve_model(str(gguf))
    with pytest.raises(FileNotFoundError, match="has no config.json, so it is not a tridlm checkpoint folder"):
        default_model.resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="draft adapter folder .* does not exist"):
        default_model.locate_model(tmp_path, draft_adapter=tmp_path / "nope")


def test_a_missing_drafter_raises_unless_a_fallback_is_given(as_default, monkeypatch):
    import tridlm.convert

    base, _ = as_default
    monkeypatch.undo()
    monkeypatch.setattr(default_model, "has_drafter", lambda: False)
    monkeypatch.setattr(tridlm.convert, "smollm2_base", lambda *a, **k: base)
    with pytest.raises(FileNotFoundError, match="the default model's drafter is missing"):
        default_model.locate_model("default")
    seen = []
    s = default_model.locate_model("default", fallback=seen.append)
    assert (s.name, s.kind, s.folder, s.draft_adapter) == ("default", "smollm2", base, False)
    assert "drafter is missing" in str(seen[0])
