"""Does mixing in infilling examples hurt the AR and diffusion losses? A paired training experiment.

Two runs differ only in `FimConfig` (same recipe, seed, tokenizer, data order and noise): one plain,
one with FIM-ordered rows and hole noise mixed in. Both are validated on the same plain held-out rows,
so the relative change of the held-out AR and diffusion losses is the cost of the mix.

The mix is the recipe's `objective.fim_rate` / `objective.hole_rate`: the trainer applies
`tridlm.training.fim.transform_batch` where its micro-batches are made, after the sampler's rows and the
noise are drawn, before corruption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..tokenizer import add_fim_tokens
from ..training.fim import FimConfig
from ..training.trainer import train

RECIPE = {
    "seed": 0,
    "model": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 3,
              "num_key_value_heads": 3, "max_position_embeddings": 1024, "block_size": 16},
    "data": {"sources": ["stdlib"], "seq_len": 256, "val_fraction": 0.02},
    "objective": {"alpha": 0.3},
    "train": {"steps": 600, "global_batch": 16, "micro_batch": 16, "lr": 3e-3, "min_lr": 3e-4,
              "warmup_steps": 30, "schedule": "cosine"},
    "eval": {"every": 0, "sequences": 96, "at_start": False},
    "checkpoint": {"every": 0, "keep": 1},
    "log": {"progress": False, "plot": False},
}


def build_tokenizer(folder: Path, vocab_size: int = 4096, sources=("stdlib",), val_fraction: float = 0.02):
    """A byte-level BPE on the training split, with the FIM sentinels added (reused when present)."""
    from ..tokenizer import Tokenizer
    from ..training.bpe import train_bpe
    from ..training.corpora import split_documents

    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    train_docs, _ = split_documents(list(sources), val_fraction)
    tok = train_bpe((d.text for d in train_docs if d.text), vocab_size)
    add_fim_tokens(tok)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(folder)
    return Tokenizer.from_folder(folder)


def run_pair(out: Path, steps: int, fim_rate: float, hole_rate: float, threads: int = 1,
             which=("plain", "fim")) -> dict:
    from ..training.recipe import load_recipe

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out / "tokenizer")
    results = {}
    for name in which:
        cfg = FimConfig() if name == "plain" else FimConfig(fim_rate=fim_rate, hole_rate=hole_rate)
        recipe = load_recipe(base=RECIPE, overrides={
            "out_dir": str(out / name), "tokenizer.path": str(out / "tokenizer"), "train.steps": steps,
            "train.threads": threads, "data.cache_dir": str(out / "data"),
            "objective.fim_rate": cfg.fim_rate, "objective.hole_rate": cfg.hole_rate})
        result = train(recipe)
        val = [h for h in result.history if h.get("kind") == "val"][-1]
        results[name] = {"fim": cfg.__dict__, "model": str(result.final_model), **val}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def final_validation(run_dir: Path) -> dict | None:
    """The last validation record of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [json.loads(line) for line in path.read_text().splitlines() if '"kind": "val"' in line]
    return vals[-1] if vals else None


def comparison_markdown(out: Path, fim_rate: float, hole_rate: float) -> str:
    """Held-out losses of the plain and the infilling-mixed run, and their relative change."""
    plain, fim = final_validation(out / "plain"), final_validation(out / "fim")
    if plain is None or fim is None:
        raise FileNotFoundError(f"{out} lacks a finished plain or fim run")
    rows = ["| held-out loss | plain | with infilling examples | relative change |", "|---|---|---|---|"]
    for key, name in (("ar_loss", "AR cross-entropy"), ("diff_ce", "diffusion cross-entropy (masked tokens)"),
                      ("diff_loss", "diffusion loss (1/p-weighted, the objective's term)")):
        a, b = plain.get(key), fim.get(key)
        if a is not None and b is not None:
            rows.append(f"| {name} | {a:.4f} | {b:.4f} | {100 * (b - a) / a:+.2f}% |")
    return (f"Both runs: the same recipe, seed, tokenizer, data order and noise, step {plain['step']}; "
            f"validated on the same {plain['sequences']} plain held-out rows. The mixed run rewrites "
            f"{fim_rate:.0%} of rows in FIM order and gives {hole_rate:.0%} of rows hole noise.\n\n"
            + "\n".join(rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--fim-rate", type=float, default=0.25)
    ap.add_argument("--hole-rate", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=("plain", "fim"), default=None)
    ap.add_argument("--report", action="store_true", help="only compare two finished runs")
    ap.add_argument("--bench-md", default=None, metavar="PATH", help="also put the comparison in PATH's "
                    "'Infilling and revision' section")
    a = ap.parse_args(argv)
    if not a.report:
        res = run_pair(a.out, a.steps, a.fim_rate, a.hole_rate, a.threads,
                       (a.only,) if a.only else ("plain", "fim"))
        print(json.dumps(res, indent=2))
    if a.report or not a.only:
        md = comparison_markdown(a.out, a.fim_rate, a.hole_rate)
        print(md)
        if a.bench_md:
            from .report import update_section

            cmd = (f"python -m tridlm.eval.fim_training OUT --steps {a.steps} --fim-rate {a.fim_rate} "
                   f"--hole-rate {a.hole_rate}")
            update_section(a.bench_md, "training-mix", f"### Training with infilling examples\n\nCommand: `{cmd}` "
                           f"(the recipe `tridlm.eval.fim_training.RECIPE`: a 3-layer model trained from scratch on "
                           f"the stdlib, block size 16, rows of 256 tokens).\n\n{md}")


if __name__ == "__main__":
    main()
