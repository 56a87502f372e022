"""`tridlm bench` options become BenchSettings; --quick starts from the quick preset."""

from tridlm.bench import BenchSettings
from tridlm.cli import build_parser
from tridlm.commands.bench import command_line, settings_from_args


def parse(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_quick_preset_and_overrides():
    args = parse("some/model", "--quick", "--block-lengths", "4,8", "--dtypes", "fp32", "--thresholds", "0.5,0.9",
                 "--prompts", "gsm8k", "--no-hf", "--repeats", "5")
    s = settings_from_args(args)
    assert args.model == "some/model" and args.func is not None
    assert s.quick and s.block_lengths == (4, 8) and s.dtypes == ("fp32",) and s.thresholds == (0.5, 0.9)
    assert s.prompts == "gsm8k" and not s.hf_baseline and s.repeats == 5
    assert command_line(args) == ("tridlm bench some/model --quick --prompts gsm8k --no-hf --repeats 5 "
                                  "--block-lengths 4,8 --thresholds 0.5,0.9 --dtypes fp32")
    assert s.n_prompts == BenchSettings.quick_settings().n_prompts  # untouched fields keep the preset


def test_full_run_defaults_cover_the_issue_sweeps():
    s = settings_from_args(parse())
    assert parse().model == "default"
    assert not s.quick and s.hf_baseline
    assert s.block_lengths == (4, 8, 16, 32) and s.thresholds == (0.5, 0.7, 0.9, 0.95)
    assert s.batch_sizes == (1, 4, 16) and s.dtypes == ("fp32", "bf16", "int8")  # int8: weight-only, opt-in
    assert s.cost_tokens[0] == 1 and s.cost_tokens[-1] == 64


def test_cli_run_on_a_checkpoint_writes_its_outputs(tmp_path, monkeypatch):
    import torch
    from conftest import random_model

    from tridlm.bench.prompts import STORY_OPENINGS
    from tridlm.cli import main
    from tridlm.training.bpe import train_bpe

    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path / "cache"))
    tok = train_bpe(list(STORY_OPENINGS) * 4, vocab_size=320)
    model = random_model(seed=0, vocab_size=320, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                         num_hidden_layers=1)
    model.save(tmp_path / "ckpt", tokenizer=tok)
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", str(tmp_path / "ckpt"), "--quick", "--threads", "1", "--prompts", "stories",
                   "--n-prompts", "1", "--max-new-tokens", "2", "--repeats", "1", "--block-lengths", "2",
                   "--thresholds", "0.9", "--batch-sizes", "1", "--dtypes", "fp32", "--modes", "ar,spec",
                   "--no-hf", "--no-profile", "--no-rss", "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"bench.md", "bench.json", "cost_profile.png"}
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "`tridlm bench " + str(tmp_path / "ckpt") + " --quick --prompts stories --out " in md
    assert "--block-lengths 2 --thresholds 0.9 " in md
