"""Every decoding mode on one fixed prompt set: quality next to speed, one table.

Outputs and their counts (tokens per forward, acceptance lengths) come from batched greedy runs over the
whole set: at greedy a row's tokens and forwards do not depend on the rows beside it (the batching
tests hold that), so the set takes minutes instead of hours. Tokens/s comes from single-stream runs over
the first prompts of each kind (medians of repeats, generated tokens only), and the speedup is over AR
measured the same way, in the same process; those runs' outputs are checked against the batched ones.
Quality: GSM8K exact-answer accuracy, the AR-judged negative log-likelihood per generated token (the
model's own causal pass scoring each output), and identical-to-AR for the lossless modes. One more row is
the base model without its drafter (SmolLM2 as converted, for the default model), AR.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from ..bench.prompts import Prompt
from ..bench.runner import BenchConfig, BenchSettings, measure_tridlm, quality

DEFAULT_SET = "gsm8k:50,humaneval:20,stories:20"


@dataclass(frozen=True)
class ModeRun:
    label: str
    mode: str
    block_length: int | None = None
    threshold: float | None = None
    base: bool = False  # the model without its drafter


def default_runs(block_length: int = 8, quadratic_block_length: int = 4, threshold: float = 0.9) -> list[ModeRun]:
    return [ModeRun("AR", "ar"),
            ModeRun(f"self-speculation, linear (L={block_length})", "spec", block_length),
            ModeRun(f"self-speculation, quadratic (L={quadratic_block_length})", "spec-quadratic",
                    quadratic_block_length),
            ModeRun(f"diffusion (L={block_length}, threshold {threshold:g})", "diffusion", block_length, threshold),
            ModeRun("base model without drafter, AR", "ar", base=True)]


@dataclass
class ModeResult:
    run: ModeRun
    generated_tokens: int
    forwards: int
    acceptance_lengths: list[int]
    quality: dict
    tokens_per_s: list[float] = field(default_factory=list)
    speed_prompts: int = 0
    speed_matches_batched: bool | None = None
    speedup_vs_ar: float | None = None
    seconds: float = 0.0

    @property
    def tpf(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else float("nan")

    @property
    def acceptance(self) -> float | None:
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else None

    @property
    def tokens_per_s_median(self) -> float | None:
        return statistics.median(self.tokens_per_s) if self.tokens_per_s else None

    def to_dict(self) -> dict:
        return {"label": self.run.label, "mode": self.run.mode, "block_length": self.run.block_length,
                "threshold": self.run.threshold, "base_without_drafter": self.run.base,
                "generated_tokens": self.generated_tokens, "forwards": self.forwards, "tpf": self.tpf,
                "acceptance_mean": self.acceptance, "quality": self.quality,
                "tokens_per_s": {"median": self.tokens_per_s_median, "repeats": self.tokens_per_s,
                                 "prompts": self.speed_prompts},
                "speed_outputs_match_batched": self.speed_matches_batched, "speedup_vs_ar": self.speedup_vs_ar,
                "seconds": self.seconds}


def speed_subset(prompts: list[Prompt], per_kind: int) -> list[int]:
    """Indices of the first `per_kind` prompts of each kind."""
    seen: dict[str, int] = {}
    out = []
    for i, p in enumerate(prompts):
        if seen.get(p.kind, 0) < per_kind:
            seen[p.kind] = seen.get(p.kind, 0) + 1
            out.append(i)
    return out


def evaluate_modes(model, base_model, prompts: list[Prompt], runs: list[ModeRun], max_new_tokens: int = 256,
                   batch_size: int = 16, speed_per_kind: int = 2, repeats: int = 2, log=print) -> list[ModeResult]:
    """Run every mode of `runs` over `prompts` (see the module docstring); `base_model` serves base runs."""
    tokenizer = model.tokenizer
    prompt_ids = [p.encode(tokenizer) for p in prompts]
    fast = speed_subset(prompts, speed_per_kind)
    results: list[ModeResult] = []
    reference = None
    for run in runs:
        m = base_model if run.base else model
        t0 = time.perf_counter()
        cfg = BenchConfig(run.mode, run.block_length, run.threshold, batch_size)
        batched = measure_tridlm(m, cfg, run.block_length, prompt_ids,
                                 BenchSettings(max_new_tokens=max_new_tokens, repeats=1))
        res = ModeResult(run, batched.generated_tokens, batched.forwards, batched.acceptance_lengths, {})
        if speed_per_kind > 0:
            alone = measure_tridlm(m, BenchConfig(run.mode, run.block_length, run.threshold, 1), run.block_length,
                                   [prompt_ids[i] for i in fast],
                                   BenchSettings(max_new_tokens=max_new_tokens, repeats=repeats))
            res.tokens_per_s, res.speed_prompts = alone.tokens_per_s, len(fast)
            res.speed_matches_batched = alone.outputs == [batched.outputs[i] for i in fast]
        if run.mode == "ar" and not run.base and reference is None:
            reference = batched.outputs
        res.quality = quality(batched, prompts, prompt_ids, reference, model, tokenizer)
        res.seconds = round(time.perf_counter() - t0, 1)
        results.append(res)
        a = f"  acceptance {res.acceptance:.2f}" if res.acceptance else ""
        log(f"  {run.label:<46} TPF {res.tpf:5.2f}{a}  NLL {res.quality.get('ar_nll') or 0:.3f}  "
            f"{res.tokens_per_s_median or 0:6.2f} tok/s  ({res.seconds:.0f} s)")
    ar = next((r for r in results if r.run.mode == "ar" and not r.run.base), None)
    for r in results:
        if ar is not None and ar.tokens_per_s_median and r.tokens_per_s_median:
            r.speedup_vs_ar = r.tokens_per_s_median / ar.tokens_per_s_median
    return results


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(results: list[ModeResult], prompts: list[Prompt], command: str, description: str, meta: dict) -> str:
    """The results table; `meta` is `tridlm.machine.machine_info` plus `dtype` and `max_new_tokens`."""
    kinds: dict[str, int] = {}
    for p in prompts:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    ar = next((r for r in results if r.run.mode == "ar" and not r.run.base), None)
    lines = [f"Model: {description}. Prompts: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) +
             f"; greedy, at most {meta['max_new_tokens']} new tokens, stopping at EOS; "
             f"{meta.get('gpu') or meta['cpu']}, {meta['dtype']}, {meta['torch_threads']} threads.", "",
             f"Command: `{command}`", "",
             "| mode | GSM8K accuracy | TPF | mean acceptance | tokens/s | speedup over AR | AR-judged NLL / token "
             "| NLL vs AR | identical to AR |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        q = r.quality
        acc = q.get("gsm8k_accuracy")
        acc_s = f"{acc:.0%} ({round(acc * q['gsm8k_graded'])}/{q['gsm8k_graded']})" if acc is not None else ""
        nll = q.get("ar_nll")
        rel = f"{nll / ar.quality['ar_nll'] - 1:+.0%}" if ar and nll and ar.quality.get("ar_nll") else ""
        ident = f"{q['identical_to_ar']}/{len(prompts)}" if "identical_to_ar" in q else ""
        speedup = f"{r.speedup_vs_ar:.2f}x" if r.speedup_vs_ar else ""
        lines.append(f"| {r.run.label} | {acc_s} | {r.tpf:.2f} | {_f(r.acceptance, '.2f')} | "
                     f"{_f(r.tokens_per_s_median, '.2f')} | {speedup} | {_f(nll, '.3f')} | {rel} | {ident} |")
    speed = next((r for r in results if r.speed_prompts), None)
    if speed is not None:
        same = all(r.speed_matches_batched for r in results if r.speed_prompts)
        lines += ["", f"Tokens/s: single-stream over the first {speed.speed_prompts // max(1, len(kinds))} prompts "
                  f"of each kind ({speed.speed_prompts} prompts), median of {len(speed.tokens_per_s)} repeats; "
                  "everything else over the whole set, from batched runs"
                  + (" (the single-stream outputs equal the batched ones for every mode)." if same else
                     " (NOTE: some single-stream outputs differ from the batched ones).")]
    return "\n".join(lines) + "\n"
