"""The whole infilling and revision evaluation of one model: tasks, runs, JSON and Markdown."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from ..tokenizer import fim_tokens
from . import report
from .runner import (
    DEFAULT_REVISION_SETTINGS,
    SETTINGS,
    records_to_json,
    run_infill,
    run_revision,
    summarise_infill,
    summarise_revision,
)
from .sandbox import Limits
from .tasks import HUMANEVAL_KINDS, humaneval_tasks, revision_tasks, stdlib_tasks

INFILL_TASKS = HUMANEVAL_KINDS + ("stdlib",)


DESCRIPTIONS = {"default": "the default model (SmolLM2-135M tri-mode, LoRA drafter)",
                "smollm2": "the converted SmolLM2-135M-Instruct base (no drafter, no FIM training)"}


def load_model(name: str, log=print):
    """(model, description): a checkpoint folder, "smollm2" (the converted SmolLM2 base) or "default" (the
    default tri-mode model; the SmolLM2 base, said so, when it is not available)."""
    from ..default_model import locate_model

    source = locate_model(name, fallback=lambda e: log(f"the default model is not available ({e}); evaluating "
                                                       "the converted SmolLM2 base instead"))
    return source.load(), DESCRIPTIONS.get(source.kind, f"checkpoint {name}")


def default_methods(model) -> list[str]:
    methods = ["left", "block", "block-nosuffix", "rank"]
    if fim_tokens(getattr(model, "tokenizer", None)) is not None:
        methods.append("fim")
    return methods


def eval_infill(model, tasks=INFILL_TASKS, n: int = 20, stdlib_n: int | None = None, methods=None,
                settings=SETTINGS, seed: int = 0, max_length: int = 48, timeout_s: float = 10.0, log=print,
                max_context: int | None = None, nll_layouts=()) -> dict:
    methods = list(methods or default_methods(model))
    all_tasks = []
    for kind in tasks:
        if kind == "stdlib":
            all_tasks += stdlib_tasks(stdlib_n or n, seed)
        else:
            all_tasks += humaneval_tasks(kind, n, seed)
    records = run_infill(model, all_tasks, methods, settings, max_length, Limits(timeout_s=timeout_s), log,
                         max_context)
    out = {"methods": methods, "settings": list(settings), "records": records_to_json(records),
           "summary": summarise_infill(records)}
    if nll_layouts:
        from .likelihood import nll_table
        from .runner import trim_context

        out["nll"] = {}
        for kind in dict.fromkeys(t.kind for t in all_tasks):
            kt = [trim_context(t, model.tokenizer, max_context) for t in all_tasks if t.kind == kind]
            out["nll"][kind] = nll_table(model, kt, list(nll_layouts))
    return out


def eval_revise(model, n: int = 30, seed: int = 0, settings=DEFAULT_REVISION_SETTINGS, log=print) -> dict:
    tasks = revision_tasks(model.tokenizer, n, seed)
    records = run_revision(model, tasks, settings, log)
    return {"settings": [s.name for s in settings], "records": records_to_json(records),
            "summary": summarise_revision(records)}


def markdown(description: str, command: str, infill: dict | None, revise: dict | None, title: str | None = None) -> str:
    parts = [f"### {title or 'Results'}",
             f"Model: {description}. Command: `{command}` ({time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()} CPU, greedy).", ""]
    if infill:
        methods = infill["methods"]
        summ = infill["summary"]
        he = [r for r in summ if r["kind"] in HUMANEVAL_KINDS]
        if he:
            parts += ["Human-eval infilling: pass rate of the completed programs (exact match in brackets). "
                      "`left` ignores the suffix (plain left-to-right generation): the baseline.", "",
                      report.infill_table(he, methods, "pass_rate"), ""]
        sl = [r for r in summ if r["kind"] == "stdlib-line"]
        if sl:
            parts += ["Held-out stdlib functions, one line removed: exact match (stripped).", "",
                      report.infill_table(sl, methods, "exact_match"), ""]
        parts += ["Cost per hole-filling call:", "", report.cost_table(summ, methods), ""]
        if infill.get("nll"):
            parts += ["Negative log-likelihood of the true middle (nats per token; first hole) under each "
                      "context layout: `left`/`fim` are causal chains, `block-wN` one masked pass over the "
                      "block [last prefix token, masks, N suffix tokens]; compare left with fim and block-w0 with "
                      "block-wN.", "", report.nll_table(infill["nll"]), ""]
    if revise:
        parts += ["Revision of held-out stdlib code with planted errors (a token replaced by another of the "
                  "file, or two adjacent tokens swapped): planted tokens restored, correct tokens broken.", "",
                  report.revision_table(revise["summary"]), ""]
    return "\n".join(parts)


def write_outputs(out: Path, infill: dict | None, revise: dict | None, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if infill:
        (out / "infill.json").write_text(json.dumps(infill, indent=1))
    if revise:
        (out / "revise.json").write_text(json.dumps(revise, indent=1))
    (out / "report.md").write_text(md)
