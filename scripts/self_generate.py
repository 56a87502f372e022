"""Write a corpus of the model's own greedy answers, for training its drafter (tridlm.training.self_generated).

    python scripts/self_generate.py --out data/self/smollm2.jsonl [--model smollm2] [--device cuda]
        [--n-gsm8k 7473] [--n-code 3000] [--n-stories 3000] [--batch 256] [--budget-s 120]

The answers come from transformers' `generate` (greedy, batched) on the model's causal weights --
the AR mode's own predictions, which a drafter tries to guess. Rerunning appends to the same file
and skips the prompts already answered. A recipe then names the file as a data source, e.g.
``data.sources: [data/self/smollm2.jsonl, gsm8k, stdlib, shakespeare]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tridlm.bench.hf_baseline import to_transformers
from tridlm.default_model import resolve_model
from tridlm.loader import load
from tridlm.training.corpora import DEFAULT_GSM8K
from tridlm.training.self_generated import mixed_prompts, write_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="smollm2", help="a checkpoint folder, or smollm2 (the packaged base)")
    ap.add_argument("--gguf", default=None, help="with --model smollm2: convert this GGUF file instead")
    ap.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, help="GSM8K train JSONL")
    ap.add_argument("--n-gsm8k", type=int, default=7473)
    ap.add_argument("--n-code", type=int, default=3000)
    ap.add_argument("--n-stories", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--budget-s", type=float, default=None, help="start no batch after this many seconds")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer at most")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.model == "smollm2" and args.gguf is not None:
        from tridlm.convert import smollm2_base

        model = load(smollm2_base(gguf_path=args.gguf), draft_adapter=False)
    else:  # a checkpoint folder, 'smollm2' or 'default' (its base: the drafter is not used)
        model = resolve_model(args.model, draft_adapter=False)
    tokenizer = model.tokenizer
    hf = to_transformers(model).to(device=args.device, dtype=getattr(torch, args.dtype))
    prompts = mixed_prompts(args.n_gsm8k, args.n_code, args.n_stories, args.seed, args.gsm8k)
    print(f"{len(prompts)} prompts -> {args.out}", flush=True)
    stats = write_corpus(hf, tokenizer, prompts, args.out, args.max_new_tokens, args.batch, args.budget_s,
                         log=lambda m: print(m, flush=True))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
