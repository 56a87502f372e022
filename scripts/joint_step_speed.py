"""What a server step costs when its batches step apart and when they share one forward
(`tridlm.decoding.step_together`): an AR batch and a diffusion batch of the default model, the shapes the
mixed load gives (24 AR rows and 8 diffusion rows by default; `--quadratic-rows` adds spec-quadratic rows
to the diffusion batch, as a server's width classes do), stepped one after the other and then together,
in the same process, medians of repeats.

    python scripts/joint_step_speed.py --threads 2 --batch-invariant      # as the mixed-load runs serve

Reports milliseconds per step: AR alone, diffusion alone, the two apart (their sum, as the runner stepped
them before) and together. Every step is a real decode step (sampling and cache updates included).
`--join-prompt N` also times the AR batch's step in which a row with an N-token prompt joins (a fresh row
each repeat, taken out after it): the prompt's prefill call beside the decoding rows' one-token call.
Last, a row in the middle of the AR batch leaving and a new one joining (no step): what the batch's
cache costs as requests end and start. `--one-row` also times one AR row, one diffusion row, and the two in
one forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n", "KING HENRY:\n"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a folder, 'default' or 'smollm2'")
    p.add_argument("--ar-rows", type=int, default=24)
    p.add_argument("--diffusion-rows", type=int, default=8)
    p.add_argument("--quadratic-rows", type=int, default=0, metavar="N",
                   help="N greedy spec-quadratic rows (the default block) in the diffusion batch, as a server's "
                        "width class puts them: their logits are read on demand, the others' in one product")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the model's)")
    p.add_argument("--batch-invariant", action="store_true", help="bf16 batch-invariant forwards")
    p.add_argument("--join-prompt", type=int, default=0, metavar="N",
                   help="also time the AR step in which a row with an N-token prompt joins")
    p.add_argument("--one-row", action="store_true",
                   help="also time one AR row, one diffusion row and the two in one forward (fresh batches)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from tridlm.bench.report import record
    from tridlm.decoding import DecodeBatch, GenerationParams, Row
    from tridlm.decoding.batch import step_together
    from tridlm.default_model import resolve_model
    from tridlm.engine import off_this_thread
    from tridlm.machine import cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)

    def run() -> dict:
        dtype = torch.bfloat16 if args.batch_invariant else getattr(torch, args.dtype or "float32")
        model = resolve_model(args.model, dtype=dtype)
        model.set_weight_format("float")
        if args.batch_invariant:
            model.set_batch_invariant()
        tok = model.tokenizer

        def batch(mode: str, n: int) -> DecodeBatch:
            params = GenerationParams(mode=mode, max_new_tokens=256, ignore_eos=True)
            return DecodeBatch(model, [Row(tok.encode(PROMPTS[i % len(PROMPTS)]), params, model.config, tok)
                                       for i in range(n)])

        def timed(step) -> float:
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1000

        with torch.inference_mode():
            ar, diffusion = batch("ar", args.ar_rows), batch("diffusion", args.diffusion_rows)
            if args.quadratic_rows:
                quadratic = GenerationParams(mode="spec-quadratic", max_new_tokens=256, ignore_eos=True)
                diffusion.add(*[Row(tok.encode(PROMPTS[i % len(PROMPTS)]), quadratic, model.config, tok)
                                for i in range(args.quadratic_rows)])
            for _ in range(6):  # prefills and first blocks, out of the numbers
                step_together([ar, diffusion])
            out = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "ar_rows": args.ar_rows,
                   "diffusion_rows": args.diffusion_rows, "quadratic_rows": args.quadratic_rows,
                   "batch_invariant": args.batch_invariant,
                   "dtype": str(model.dtype).removeprefix("torch."), "ms": {}}
            ms = out["ms"]
            ms["ar"] = timed(ar.step)
            ms["diffusion"] = timed(diffusion.step)
            ms["together"] = timed(lambda: step_together([ar, diffusion]))
            ms["apart"] = ms["ar"] + ms["diffusion"]
            if args.join_prompt:
                ids = (tok.encode(" ".join(PROMPTS)) * args.join_prompt)[:args.join_prompt]
                params = GenerationParams(mode="ar", max_new_tokens=8, ignore_eos=True)

                def join():
                    row = Row(ids, params, model.config, tok)
                    row.prefill_chunk = args.join_prompt  # the whole prompt in one forward
                    ar.add(row)
                    ar.step()
                    ar.remove(row)

                ms[f"ar_with_a_{args.join_prompt}_token_prompt_joining"] = timed(join)

            def churn():  # a row in the middle leaves and a new one joins, as requests end and start
                ar.remove(ar.rows[len(ar.rows) // 2])
                ar.add(Row(tok.encode(PROMPTS[0]), GenerationParams(mode="ar", max_new_tokens=256, ignore_eos=True),
                           model.config, tok))

            ms["ar_one_row_leaving_one_joining"] = timed(churn)
            if args.one_row:  # a server's batches when one request of each runs
                one_ar, one_diffusion = batch("ar", 1), batch("diffusion", 1)
                for _ in range(5):
                    step_together([one_ar, one_diffusion])
                ms["ar_one_row"] = timed(one_ar.step)
                ms["diffusion_one_row"] = timed(one_diffusion.step)
                ms["one_ar_row_and_one_diffusion_row_together"] = timed(lambda: step_together([one_ar, one_diffusion]))
        return out

    out = off_this_thread(run)  # the timing thread holds the only OpenMP pool, as in the server
    record(out, args.json)
    print(f"apart {out['ms']['apart']:.1f} ms, together {out['ms']['together']:.1f} ms "
          f"({out['ms']['apart'] / out['ms']['together']:.2f}x)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
