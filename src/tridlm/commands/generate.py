"""`tridlm generate MODEL [PROMPT]`: one generation in any mode; the prompt from the argument or stdin."""

from __future__ import annotations

import argparse
import json
import sys

from tridlm.default_model import MODEL_CHOICES

HELP = """\
Modes: ar (one token per forward), diffusion (block denoising over a prefix cache), spec (linear
self-speculation: a diffusion draft, then a causal verify pass; identical to ar at temperature 0),
spec-quadratic (one forward per cycle verifies and drafts). The text goes to stdout, a one-line
summary of the metrics to stderr; --json prints the text, ids and every metric as JSON instead
(with --stream: one JSON line per chunk, then the result)."""


def _block_length(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None



# the GenerationParams fields the CLI offers and how argparse reads each; defaults, ranges and help
# text are the fields' own (tridlm.decoding.params)
CLI_PARAMS = {"mode": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
              "stop": "repeat", "ignore_eos": "flag", "block_length": _block_length, "threshold": float,
              "commit_threshold": float, "draft_threshold": float, "steps": int, "selection_policy": str}


def add_param_args(p: argparse.ArgumentParser, names=tuple(CLI_PARAMS), **defaults) -> None:
    """`--name` options for these GenerationParams fields; `defaults` overrides a field's default."""
    from tridlm.decoding.params import GenerationParams

    for name in names:
        d, kind, flag = GenerationParams.declared(name), CLI_PARAMS[name], "--" + name.replace("_", "-")
        default = defaults.get(name, d["default"])
        if kind == "flag":
            p.add_argument(flag, action="store_true", help=d["help"])
        elif kind == "repeat":
            p.add_argument(flag, action="append", default=[], metavar="TEXT", help=d["help"] + " (repeatable)")
        else:
            shown = "" if default is None else f" (default {default})"
            p.add_argument(flag, type=kind, default=default, help=d["help"] + shown)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_CHOICES)
    add_param_args(p)
    p.add_argument("--stream", action="store_true", help="print text as it becomes final")
    p.add_argument("--json", action="store_true", help="print the result and metrics as JSON")
    add_load_args(p)


def add_load_args(p: argparse.ArgumentParser) -> None:
    """How a command loads its model: device, dtype, and whether a LoRA drafter is used."""
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "int8", "int4"), default=None,
                   help="compute dtype (default: the checkpoint's); int8 / int4: weight-only products with bf16 "
                   "activations (int4: 4-bit groups of 32, like GGUF's Q4_1), faster on CPUs, not AR's exact fp32 "
                   "output (README, What is exact)")
    p.add_argument("--no-draft-adapter", action="store_true", help="ignore a LoRA drafter in the checkpoint")
    p.add_argument("--kernels", choices=("eager", "compiled"), default="eager",
                   help="compiled: decode steps and --block-length blocks as Inductor graphs with frozen weights "
                   "(one to three minutes of compiling per shape on first use, cached on disk; measured on a "
                   "2-core AMD EPYC: AR 2.1x eager in fp32, 1.4x in bf16, 1.8x in int8). bf16 and int8 narrow "
                   "forwards take tridlm's own CPU products where measured faster (TRIDLM_NATIVE=0: torch's only)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text in AR, diffusion or self-speculative mode",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                   help="the prompt (omitted or '-': read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.set_defaults(func=run)


def generation_params(args, names=tuple(n for n in CLI_PARAMS if n != "mode")) -> dict:
    """The GenerationParams fields `add_param_args` gave options for, as parsed."""
    return {n: tuple(getattr(args, n)) if CLI_PARAMS[n] == "repeat" else getattr(args, n) for n in names}


def load_model(args, params: dict):
    """Validate the parameters against the checkpoint's config, then load it (no forward runs)."""
    import torch

    from tridlm.checkpoint import read_config
    from tridlm.decoding.params import AUTO, GenerationParams
    from tridlm.default_model import locate_model

    source = locate_model(args.model, draft_adapter=not args.no_draft_adapter)  # 'default', 'smollm2' or a folder
    auto = params.get("block_length") == AUTO
    checked = dict(params, block_length=1) if auto else params  # "auto" is measured once the model is loaded
    resolved = GenerationParams(mode=args.mode, **checked).resolve(read_config(source.folder))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = source.load(device=device)
    return prepared(model, args, AUTO if auto else resolved.block_length)


def prepared(model, args, block_length=None):
    """The model in the --dtype and --kernels chosen (compiled graphs for AR steps and block_length wide blocks)."""
    import torch

    if args.dtype in ("int8", "int4"):
        model = model.to(torch.bfloat16).set_weight_format(args.dtype)
    elif args.dtype:
        model = model.to(getattr(torch, args.dtype))
    if model.dtype == torch.bfloat16 and model.weight_format == "float" and model.device.type == "cpu":
        model.set_weight_format("float")  # measures where tridlm's own bf16 products win here
    if args.kernels == "compiled":
        mode = getattr(args, "mode", None)
        if mode == "ar" or not isinstance(block_length, int):
            block_length = None  # AR compiles its one-token step only
        model.compile_decode(tokens=(1, block_length) if block_length else (1,))
        warm_compiled(model, mode or "ar", block_length)
    return model


def warm_compiled(model, mode: str = "ar", block_length=None) -> None:
    """Compile (or load from torch's disk cache) the decode graphs now, on a dummy prompt, so that the
    first request's time and tokens/s are the engine's, not the compiler's."""
    import time

    import torch

    print("compiling decode graphs (minutes on a machine's first use; later runs load them) ...", file=sys.stderr)
    t0 = time.perf_counter()
    ids = list(range(4, 12))
    with torch.inference_mode():
        if block_length:
            model.generate(ids, mode, block_length=block_length, max_new_tokens=2 * block_length, ignore_eos=True)
        else:
            model.generate(ids, "ar", max_new_tokens=2, ignore_eos=True)
    print(f"decode graphs ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def summary(result) -> str:
    m = result.metrics
    parts = [f"[{result.mode}] {m.generated_tokens} tokens",
             f"{m.forwards} forwards (+{m.prefill_forwards} prefill)"]
    if m.tokens_per_forward is not None:
        parts.append(f"TPF {m.tokens_per_forward:.2f}")
    if m.acceptance_lengths:
        parts.append(f"acceptance {sum(m.acceptance_lengths) / len(m.acceptance_lengths):.2f}")
    if m.denoise_passes:
        parts.append(f"denoise passes/block {sum(m.denoise_passes) / len(m.denoise_passes):.2f}")
    if m.tokens_per_second is not None:
        parts.append(f"{m.tokens_per_second:.1f} tok/s")
    parts.append(f"{m.wall_time_s:.2f} s")
    return ", ".join(parts)


def run(args) -> int:
    from tridlm.generate import generate

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    params = generation_params(args)
    model = load_model(args, params)
    add_special = True
    if args.chat:
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer: --chat needs one")
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        add_special = False
    if prompt == "" and model.tokenizer is not None and model.tokenizer.bos_id is not None:
        prompt = [model.tokenizer.bos_id]  # an empty prompt: start from BOS
    out = generate(model, prompt, args.mode, stream=args.stream, add_special_tokens=add_special, **params)
    if args.stream:
        for chunk in out:
            if args.json:
                print(json.dumps({"text": str(chunk), "ids": chunk.ids}), flush=True)
            else:
                print(chunk, end="", flush=True)
        result = out.result
    else:
        result = out
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        if not args.stream:
            print(result.text, end="")
        print()
        print(summary(result), file=sys.stderr)
    return 0
