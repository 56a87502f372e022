"""`tridlm revise MODEL [TEXT]`: re-mask the tokens the model doubts and denoise them again."""

from __future__ import annotations

import argparse
import json
import sys

from tridlm.decoding.params import declaration
from tridlm.decoding.revise import ReviseOptions

from .infill import add_model_args, load_model, sampler_params

HELP = """\
TEXT (or stdin when omitted or '-') is scored token by token -- the model's probability of each
token with that token masked and everything else visible -- and the tokens below --remask-threshold
(or the --budget least likely) are masked and denoised again, --rounds times. --prefix/--suffix are context
that is read but never changed. The revised text goes to stdout, the changed tokens to stderr;
--json prints both. A budget of 0 returns the text unchanged."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("revise", help="revise a text: re-denoise its least likely tokens",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the text (omitted or '-': stdin)")
    p.add_argument("--prefix", default="", help="context before the text (never changed)")
    p.add_argument("--suffix", default="", help="context after the text (never changed)")
    for name, kind in (("rounds", int), ("budget", float), ("remask_threshold", float), ("window", int),
                       ("groups", int), ("min_gain", float)):
        d = declaration(ReviseOptions, name)
        flags = ["--" + name.replace("_", "-")] + (["--mask-threshold"] if name == "remask_threshold" else [])
        default = None if name == "window" else d["default"]  # window: half the model's block
        p.add_argument(*flags, type=kind, default=default, help=d["help"] + (
            " (default: half a block)" if name == "window" else "" if default is None else f" (default {default})"))
    p.set_defaults(func=run)


def run(args) -> int:
    from tridlm.edit import revise

    text = sys.stdin.read() if args.text in (None, "-") else args.text
    budget = args.budget
    if budget is not None and (budget >= 1 or budget == 0):
        budget = int(budget)
    model = load_model(args)
    params = sampler_params(args)
    commit = params.pop("threshold")  # here --threshold is the re-denoiser's: --commit-threshold
    if params["commit_threshold"] is None:
        params["commit_threshold"] = commit
    r = revise(model, text, prefix=args.prefix, suffix=args.suffix, rounds=args.rounds, budget=budget,
               remask_threshold=args.remask_threshold, window=args.window, groups=args.groups,
               min_gain=args.min_gain, **params)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    sys.stdout.write(r.text)
    if not r.text.endswith("\n"):
        print()
    print(f"[revise] {len(r.changes)} token(s) changed"
          + "".join(f"\n  #{c.position} (round {c.round}): {c.old!r} -> {c.new!r}" for c in r.changes),
          file=sys.stderr)
    return 0
