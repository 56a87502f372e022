"""tridlm's AR against llama.cpp in alternating rounds, for a ratio that a shared machine's drift cannot bias.

    python scripts/anchor_pair.py --rounds 5 --threads 2 [--dtype bf16|int8] [--kernels compiled|eager]

`tridlm bench` times each engine's repeats back to back, so a neighbour's load that comes and goes
between engines moves their ratio (two runs minutes apart on a 2-core VM: llama.cpp BF16 at 76.6 and
94.8 tokens/s). Here each round times the whole prompt set once through tridlm's AR (the default
model, batch 1, greedy, EOS ignored) and once through llama.cpp on the same GGUF at the matched
precision (BF16 for bf16, Q8_0 for int8), in alternating order; the report is every round's ratio and
their median. Needs llama-cpp-python (the bench extra).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tridlm.bench import llama_cpp
from tridlm.bench.prompts import load_prompts
from tridlm.convert.smollm2 import smollm2_gguf_path
from tridlm.default_model import default_model
from tridlm.machine import cpu_name

QUANT = {"bf16": "BF16", "int8": "Q8_0"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=tuple(QUANT), default="bf16")
    p.add_argument("--kernels", choices=("compiled", "eager"), default="compiled")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args()
    if not llama_cpp.available():
        raise SystemExit(f"llama-cpp-python is not installed: {llama_cpp.INSTALL_HINT}")
    torch.set_num_threads(a.threads)
    model = default_model(torch.bfloat16)
    model.set_weight_format("int8" if a.dtype == "int8" else "float")
    if a.kernels == "compiled":
        model.compile_decode(tokens=(1,))
    prompt_ids = [q.encode(model.tokenizer) for q in load_prompts("mixed", a.n_prompts)]
    runner = llama_cpp.make_runner(smollm2_gguf_path(), QUANT[a.dtype], a.threads)
    kw = dict(max_new_tokens=a.max_new_tokens, ignore_eos=True, temperature=0.0)

    def tridlm_rate() -> float:
        t0, n = time.perf_counter(), 0
        for ids in prompt_ids:
            n += model.generate(ids, **kw).metrics.generated_tokens
        return n / (time.perf_counter() - t0)

    def llama_rate() -> float:
        n, wall = 0, 0.0
        for ids in prompt_ids:
            out, dt = runner.generate(ids, a.max_new_tokens, None, True)
            n, wall = n + len(out), wall + dt
        return n / wall

    tridlm_rate(), llama_rate()  # warm-up: compiles the graph, loads the GGUF
    ratios = []
    print(f"{cpu_name()}, {a.threads} threads; tridlm {a.dtype} {a.kernels} AR vs llama.cpp {QUANT[a.dtype]}")
    for r in range(a.rounds):
        first, second = (tridlm_rate, llama_rate) if r % 2 == 0 else (llama_rate, tridlm_rate)
        x, y = first(), second()
        ours, theirs = (x, y) if r % 2 == 0 else (y, x)
        ratios.append(ours / theirs)
        print(f"round {r + 1}: tridlm {ours:.1f} tok/s, llama.cpp {theirs:.1f} tok/s, ratio {ours / theirs:.2f}x")
    print(f"median ratio over {a.rounds} rounds: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
