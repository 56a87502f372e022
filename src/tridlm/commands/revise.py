"""`tridlm revise MODEL [TEXT]`: re-mask the tokens the model doubts and denoise them again."""

from __future__ import annotations

import argparse
import json
import sys

from .infill import add_model_args, load_model, sampler_params

HELP = """\
TEXT (or stdin when omitted or '-') is scored token by token -- the model's probability of each
token with that token masked and everything else visible -- and the tokens below --threshold (or the
--budget least likely) are masked and denoised again, --rounds times. --prefix/--suffix are context
that is read but never changed. The revised text goes to stdout, the changed tokens to stderr;
--json prints both. A budget of 0 returns the text unchanged."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("revise", help="revise a text: re-denoise its least likely tokens",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the text (omitted or '-': stdin)")
    p.add_argument("--prefix", default="", help="context before the text (never changed)")
    p.add_argument("--suffix", default="", help="context after the text (never changed)")
    p.add_argument("--rounds", type=int, default=1, help="score-and-redo rounds (default 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="tokens re-masked per round at most: a count, or a fraction below 1")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="re-mask tokens whose probability is below this (neither this nor --budget: below 0.1, "
                        "at most a tenth of the tokens)")
    p.add_argument("--window", type=int, default=None, help="tokens scored together (default: half a block)")
    p.add_argument("--groups", type=int, default=2, help="masked copies per window (0: score tokens visible)")
    p.add_argument("--min-gain", type=float, default=1.0, help="replace a token only if the new one is this many "
                   "times likelier in the same context (default 1: always)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tridlm.infill import revise

    text = sys.stdin.read() if args.text in (None, "-") else args.text
    budget = args.budget
    if budget is not None and (budget >= 1 or budget == 0):
        budget = int(budget)
    model = load_model(args)
    params = sampler_params(args)
    params["commit_threshold"] = params.pop("threshold")
    r = revise(model, text, prefix=args.prefix, suffix=args.suffix, rounds=args.rounds, budget=budget,
               threshold=args.mask_threshold, window=args.window, groups=args.groups, min_gain=args.min_gain,
               **params)
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
