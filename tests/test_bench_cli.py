"""`tridlm bench` options become BenchSettings; --quick starts from the quick preset."""

from tridlm.bench import BenchSettings
from tridlm.cli import build_parser
from tridlm.commands.bench import settings_from_args


def parse(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_quick_preset_and_overrides():
    args = parse("some/model", "--quick", "--block-lengths", "4,8", "--dtypes", "fp32", "--thresholds", "0.5,0.9",
                 "--prompts", "gsm8k", "--no-hf", "--repeats", "5")
    s = settings_from_args(args)
    assert args.model == "some/model" and args.func is not None
    assert s.quick and s.block_lengths == (4, 8) and s.dtypes == ("fp32",) and s.thresholds == (0.5, 0.9)
    assert s.prompts == "gsm8k" and not s.hf_baseline and s.repeats == 5
    assert s.n_prompts == BenchSettings.quick_settings().n_prompts  # untouched fields keep the preset


def test_full_run_defaults_cover_the_issue_sweeps():
    s = settings_from_args(parse())
    assert parse().model == "default"
    assert not s.quick and s.hf_baseline
    assert s.block_lengths == (4, 8, 16, 32) and s.thresholds == (0.5, 0.7, 0.9, 0.95)
    assert s.batch_sizes == (1, 4, 16) and s.dtypes == ("fp32", "bf16")
    assert s.cost_tokens[0] == 1 and s.cost_tokens[-1] == 64
