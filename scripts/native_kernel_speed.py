"""bf16 decoding through each of tridlm's own bf16 products (tridlm.native: the AVX-512 one and, where the CPU
has AMX, the AMX one), side by side in one process: the model's `native_kernel` set to each in turn, with
the width range (`native_max_tokens`) measured for it, then generate() per mode and batch size.

    python scripts/native_kernel_speed.py --threads 2            # the default model, 32 tokens, 3 repeats

Reports the median seconds of each (greedy, ignore_eos) and the kernel set_weight_format chose here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

CASES = ((1, "ar"), (1, "diffusion"), (1, "spec"), (8, "ar"), (8, "diffusion"), (8, "spec"))
PROMPT = "Write a short story about a robot who learns to paint."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a folder, 'default' or 'smollm2'")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from tridlm import kernels, native
    from tridlm.default_model import resolve_model
    from tridlm.engine import off_this_thread

    if args.threads:
        torch.set_num_threads(args.threads)

    def run() -> dict:
        model = resolve_model(args.model).eval().to(torch.bfloat16).set_weight_format("float")
        out = {"chosen": model.native_kernel, "amx_unavailable": native.amx_unavailable(), "kernels": {}}
        for kernel in ("native",) + (() if native.amx_unavailable() else ("amx",)):
            model.set_weight_format("float")
            model.native_kernel = kernel
            model.native_max_tokens = kernels.native_max_tokens(model, "float")
            row = out["kernels"][kernel] = {"native_max_tokens": model.native_max_tokens}
            with torch.inference_mode():
                for batch, mode in CASES:
                    prompts = [PROMPT] * batch
                    model.generate(prompts, mode, max_new_tokens=4, ignore_eos=True)  # first-use costs stay out
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        model.generate(prompts, mode, max_new_tokens=args.max_tokens, ignore_eos=True)
                        times.append(time.perf_counter() - t0)
                    row[f"{mode} x{batch}"] = round(statistics.median(times), 3)
                    print(kernel, mode, batch, row[f"{mode} x{batch}"], file=sys.stderr, flush=True)
        return out

    out = off_this_thread(run)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "result": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
