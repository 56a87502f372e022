"""`tridlm infill MODEL [TEMPLATE]`: fill the holes of a text so they fit both sides."""

from __future__ import annotations

import argparse
import json
import re
import sys

from tridlm.default_model import MODEL_CHOICES

from .generate import add_load_args, add_param_args, generation_params

HELP = """\
The text comes as TEMPLATE (or stdin when omitted or '-') holding one or more hole markers (default
<FILL>; <FILL:5> asks for exactly 5 tokens there), or as --prefix/--suffix around one hole. A hole is
--length tokens long, or (no length) up to --max-length tokens ending before the first --stop string
or at end-of-text. The completed text goes to stdout; --json prints the fills and metrics instead.

Methods (default auto): block -- the hole's masks and the suffix's first tokens in one bidirectional
diffusion block (works with any tri-mode model); fim -- <fim_prefix>/<fim_suffix>/<fim_middle>
ordering decoded in --mode (models trained for FIM); rank -- left-to-right candidates ranked by how
well they lead into the suffix; left -- the suffix ignored. auto: block in diffusion mode, else fim
when the model was trained for it, else rank."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_CHOICES)
    add_load_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_param_args(p, SAMPLER_PARAMS)


SAMPLER_PARAMS = ("temperature", "seed", "threshold", "commit_threshold", "steps")  # the denoiser's


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("infill", help="fill-in-the-middle: fill holes between given text",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("template", nargs="?", default=None, metavar="TEMPLATE",
                   help="text with hole markers (omitted or '-': stdin, unless --prefix is given)")
    p.add_argument("--prefix", default=None, help="the text before the hole (instead of a template)")
    p.add_argument("--suffix", default="", help="the text after the hole (with --prefix)")
    p.add_argument("--hole", default="<FILL>", help="the hole marker in the template (default <FILL>)")
    p.add_argument("--length", type=int, default=None, help="tokens per hole (default: variable)")
    p.add_argument("--max-length", type=int, default=32, help="variable holes: at most this many tokens")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="variable holes end before TEXT (repeatable), e.g. --stop '\\n'")
    p.add_argument("--method", default="auto", help="auto, block, fim, rank or left")
    p.add_argument("--mode", default="diffusion", help="ar, diffusion, spec or spec-quadratic (default diffusion)")
    p.add_argument("--suffix-window", type=int, default=None, help="suffix tokens a hole's block holds "
                   "(default: the model's block size)")
    p.add_argument("--candidates", type=int, default=4, help="rank: candidates; block: lengths tried for a "
                   "variable hole (default 4)")
    add_param_args(p, ("block_length",))
    p.set_defaults(func=run)


def load_model(args):
    """The model named on the command line: a checkpoint folder, 'default' or 'smollm2' (tridlm.default_model)."""
    import torch

    from tridlm.commands.generate import prepared
    from tridlm.default_model import resolve_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = resolve_model(args.model, device=device, draft_adapter=not args.no_draft_adapter)
    block_length = getattr(args, "block_length", None)  # None: the checkpoint's own block size
    return prepared(model, args, model.config.block_size if block_length is None else block_length)


def parse_template(text: str, marker: str) -> tuple[list[str], list[int | None]]:
    """(segments, per-hole lengths) of a text with `marker` or `marker` with ':N' before its last character."""
    stem, close = (marker[:-1], marker[-1]) if len(marker) > 1 else (marker, "")
    pattern = re.compile(re.escape(marker) + "|" + re.escape(stem) + r":(\d+)" + re.escape(close))
    segments, lengths, pos = [], [], 0
    for m in pattern.finditer(text):
        segments.append(text[pos:m.start()])
        lengths.append(int(m.group(1)) if m.group(1) else None)
        pos = m.end()
    segments.append(text[pos:])
    if not lengths:
        raise ValueError(f"the text holds no hole marker {marker!r}")
    return segments, lengths


def sampler_params(args) -> dict:
    return generation_params(args, SAMPLER_PARAMS)


def run(args) -> int:
    from tridlm.edit import infill

    if args.prefix is not None:
        if args.template not in (None, "-"):
            raise ValueError("give a template or --prefix/--suffix, not both")
        segments, lengths = [args.prefix, args.suffix], [None]
    else:
        text = sys.stdin.read() if args.template in (None, "-") else args.template
        segments, lengths = parse_template(text, args.hole)
    lengths = [args.length if k is None else k for k in lengths]
    stop = [s.encode().decode("unicode_escape") for s in args.stop]  # '\n' typed on a shell
    model = load_model(args)
    r = infill(model, segments=segments, length=lengths, max_length=args.max_length, stop=stop, mode=args.mode,
               method=args.method, suffix_window=args.suffix_window, candidates=args.candidates,
               block_length=args.block_length, **sampler_params(args))
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        sys.stdout.write(r.text)
        if not r.text.endswith("\n"):
            print()
        m = r.metrics
        print(f"[infill {r.method}] {sum(map(len, r.fill_ids))} tokens in {len(r.fills)} hole(s), "
              f"{m.forwards} forwards (+{m.prefill_forwards} prefill), {m.wall_time_s:.2f} s", file=sys.stderr)
    return 0
