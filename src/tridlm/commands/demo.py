"""`tridlm demo`: the default model answers a few prompts in every mode, then a speed table per mode."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tridlm.decoding.params import MODES
from tridlm.default_model import BLOCK_LENGTH_HELP

from .generate import add_param_args

LOSSLESS = ("spec", "spec-quadratic")


def demo_prompts() -> list[tuple[str, str]]:
    """(label, user message): a short story, a Python function, and the first GSM8K test question."""
    from tridlm.bench.prompts import gsm8k_prompts

    gsm = gsm8k_prompts(1)[0].text
    return [
        ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
        ("code", "Write a Python function that checks whether a string is a palindrome."),
        ("gsm8k", gsm),
    ]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="answer a few prompts in every mode with the default model and "
                              "print a speed table")
    p.add_argument("--model", default=None, help="a checkpoint folder or 'smollm2' (default: the embedded default "
                   "model)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--block-length", type=int, default=None, help=BLOCK_LENGTH_HELP)
    add_param_args(p, ("commit_threshold",))
    p.add_argument("--threshold", dest="commit_threshold", type=float, help=argparse.SUPPRESS)  # its older name
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run")
    p.add_argument("--json", type=Path, default=None, help="also write every answer and metric to this file")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[tridlm] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    import torch

    from tridlm.default_model import resolve_model
    from tridlm.generate import generate

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r} in --modes; choose from {', '.join(MODES)}")
    t0 = time.perf_counter()
    model = resolve_model(args.model, progress=_say)
    _say(f"model ready in {time.perf_counter() - t0:.1f} s ({model.num_parameters() / 1e6:.1f} M parameters)")
    tok = model.tokenizer
    block = args.block_length or model.config.block_size
    prompts = demo_prompts()
    rows, summary = [], {}
    ar_ids: dict[str, list[int]] = {}
    for mode in modes:
        params = dict(max_new_tokens=args.max_new_tokens, block_length=block, commit_threshold=args.commit_threshold)
        tokens = forwards = 0
        wall = 0.0
        accept: list[int] = []
        identical = []
        print(f"\n=== mode: {mode} (block length {block}) " + "=" * 30)
        for label, message in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": message}]) if tok.chat_template else message
            with torch.inference_mode():
                res = generate(model, text, mode=mode, add_special_tokens=False, **params)
            r = res.rows[0]
            m = r.metrics
            print(f"\n--- {label}: {message[:70]}{'...' if len(message) > 70 else ''}\n{r.text.strip()}")
            tokens += m.generated_tokens
            forwards += m.forwards
            wall += m.wall_time_s
            accept += m.acceptance_lengths
            if mode == "ar":
                ar_ids[label] = r.ids
            elif mode in LOSSLESS and label in ar_ids:
                identical.append(r.ids == ar_ids[label])
            rows.append({"mode": mode, "prompt": label, "text": r.text, "metrics": m.to_dict()})
        summary[mode] = {
            "generated_tokens": tokens, "forwards": forwards,
            "tokens_per_forward": tokens / forwards if forwards else None,
            "mean_acceptance": sum(accept) / len(accept) if accept else None,
            "tokens_per_second": tokens / wall if wall else None,
            "identical_to_ar": (all(identical) if identical else None) if mode in LOSSLESS else None,
        }
    ar_tps = summary.get("ar", {}).get("tokens_per_second")
    print("\n" + _table(summary, ar_tps))
    print(f"\n(greedy decoding; tokens/s over generated tokens only; forwards exclude the prompt prefill; "
          f"total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"block_length": block, "summary": summary, "answers": rows}, indent=2))
    return 0


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(summary: dict, ar_tps: float | None) -> str:
    head = ["mode", "tokens", "forwards", "TPF", "mean accept", "tokens/s", "speedup vs AR", "identical to AR"]
    lines = [head]
    for mode, s in summary.items():
        speed = s["tokens_per_second"] / ar_tps if ar_tps and s["tokens_per_second"] else None
        same = {True: "yes", False: "NO", None: "-"}[s["identical_to_ar"]]
        lines.append([mode, str(s["generated_tokens"]), str(s["forwards"]), _fmt(s["tokens_per_forward"], ".2f"),
                      _fmt(s["mean_acceptance"], ".2f"), _fmt(s["tokens_per_second"], ".1f"),
                      _fmt(speed, ".2f") + ("x" if speed else ""), same])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
