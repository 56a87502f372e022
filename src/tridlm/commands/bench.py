"""`tridlm bench [MODEL]`: every decoding mode side by side on a prompt set; Markdown, JSON and PNG outputs."""

from __future__ import annotations

import argparse

HELP = """\
Runs AR, block diffusion, linear and quadratic self-speculation and the transformers generate baseline
(AR, greedy, same weights) in one process, with sweeps over block length, threshold, batch size and
dtype; then the speed-of-light analysis, the hardware cost profile and block_length="auto", and the
memory-bandwidth roofline of AR decoding. Writes bench.md, bench.json and PNG plots to --out.
MODEL is a checkpoint folder, 'default' (the default tri-mode model; the converted SmolLM2 base when it is
not installed) or 'smollm2' (the converted SmolLM2-135M base)."""


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _words(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


OVERRIDES = {  # option -> (settings field, parser)
    "n_prompts": int, "max_new_tokens": int, "repeats": int, "block_length": int, "threshold": float,
    "block_lengths": _ints, "thresholds": _floats, "batch_sizes": _ints, "dtypes": _words, "modes": _words,
    "sol_prompts": int, "sol_budget": int,
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark every decoding mode side by side", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="default", metavar="MODEL",
                   help="checkpoint folder, 'default' (the default) or 'smollm2'")
    p.add_argument("--quick", action="store_true", help="a run of a few minutes (few prompts, short outputs)")
    p.add_argument("--prompts", default="mixed",
                   help="gsm8k, humaneval, stories, mixed (default), a comma list of those, or a .jsonl file")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--compiled", action="store_true", help="also AR and spec at --block-length with compiled decode "
                   "graphs in every dtype (about a minute of compiling per graph)")
    p.add_argument("--no-profile", action="store_true", help="skip the operator profile of AR decoding")
    p.add_argument("--no-rss", action="store_true", help="skip measuring the peak RSS of tridlm generate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for name, typ in OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help="comma-separated list" if typ in (_ints, _floats, _words) else None)
    p.set_defaults(func=run, parser=p)


def settings_from_args(args):
    from tridlm.bench import BenchSettings

    kw = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    kw.update(prompts=args.prompts, ignore_eos=args.ignore_eos, hf_baseline=not args.no_hf, compiled=args.compiled,
              profile=not args.no_profile, rss=not args.no_rss)
    return BenchSettings.quick_settings(**kw) if args.quick else BenchSettings(**kw)


def command_line(args) -> str:
    """The command as a user would retype it: the model and every option that differs from its default."""
    parts = ["tridlm", "bench", str(args.model)]
    for action in args.parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            parts.append(flag)
        else:
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, tuple) else str(value)
            parts += [flag, text]
    return " ".join(parts)


def run(args) -> int:
    from tridlm.bench import run_bench

    s = settings_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_bench(args.model, s, out_dir=args.out, device=args.device, command=command_line(args))
    return 0
