"""Run every decoding mode side by side, in one process, on one prompt set, and measure each.

A run is a list of `BenchConfig`s (mode, block length, threshold, batch size, dtype), built from the
sweeps of `BenchSettings`; a configuration that several sweeps share runs once. Each is timed over
the whole prompt set `repeats` times (tokens/s = generated tokens / wall time, median of repeats with
min and max), after one untimed warm-up call. Quality is read from the first repeat (greedy decoding
is deterministic): GSM8K exact-answer accuracy, token agreement with AR greedy at the same dtype, and
the negative log-likelihood the fp32 model, decoding causally (AR), assigns to the output.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch

from .prompts import Prompt, is_correct

# int8 / int4: weight-only formats with bf16 activations
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
WEIGHT_ONLY = ("int8", "int4")
BASELINES = ("hf", "llama.cpp")  # other engines, AR at batch 1


@dataclass(frozen=True)
class BenchConfig:
    mode: str  # "ar" | "diffusion" | "spec" | "spec-quadratic" | "hf" (transformers generate) | "llama.cpp"
    block_length: int | str | None = None  # int, "auto", or None (modes without blocks)
    threshold: float | None = None
    batch_size: int = 1
    dtype: str = "fp32"  # llama.cpp: its GGUF format (Q4_1, Q8_0, BF16)
    kernels: str = "eager"  # or "compiled": TriModeLM.compile_decode for its decode widths

    @property
    def label(self) -> str:
        parts = ["transformers" if self.mode == "hf" else self.mode]
        if self.block_length is not None:
            parts.append(f"L={self.block_length}")
        if self.threshold is not None:
            parts.append(f"τ={self.threshold:g}")
        parts.append(f"b={self.batch_size}")
        parts.append(self.dtype)
        if self.kernels != "eager":
            parts.append(self.kernels)
        return " ".join(parts)


@dataclass
class BenchSettings:
    prompts: str = "mixed"
    n_prompts: int = 16
    max_new_tokens: int = 64
    repeats: int = 3
    ignore_eos: bool = False
    modes: tuple[str, ...] = ("ar", "diffusion", "spec", "spec-quadratic")
    block_length: int = 32  # diffusion's default in the main comparison
    threshold: float = 0.9
    quadratic_block_length: int = 4  # its forward holds L*(L+1) tokens, so a small block
    block_lengths: tuple[int, ...] = (4, 8, 16, 32)
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95)
    threshold_block_lengths: tuple[int, ...] = (8, 32)  # block lengths the threshold sweep runs at
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    dtypes: tuple[str, ...] = ("fp32", "bf16", "int8")
    dtype_sweep_modes: tuple[str, ...] | None = None  # None: every mode of the main comparison
    hf_baseline: bool = True
    compiled: bool = False  # also AR and spec (at block_length) with compile_decode, in every dtype
    llama_cpp: bool = True  # when llama-cpp-python is installed and the model has a GGUF (bench/llama_cpp.py)
    llama_cpp_quants: tuple[str, ...] = ("Q4_1", "Q8_0", "BF16")
    gguf: str | None = None  # the GGUF llama.cpp runs; "default" / "smollm2" models find theirs
    sol_prompts: int = 4
    sol_blocks_per_prompt: int = 1
    sol_budget: int = 1000  # check forwards per block; the paper allows 5000, too slow for a CPU run
    cost_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    cost_batch_sizes: tuple[int, ...] = (1, 4, 16)
    cost_repeats: int = 5
    profile: bool = True
    rss: bool = True  # peak RSS of a `tridlm generate` subprocess (needs a model folder)
    quick: bool = False

    def __post_init__(self):  # refused before any work starts
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown or not self.dtypes:
            raise ValueError(f"unknown --dtypes {', '.join(unknown) or '(none)'}: choose from {', '.join(DTYPES)}")
        modes = ("ar", "diffusion", "spec", "spec-quadratic")
        unknown = [m for m in self.modes if m not in modes]
        if unknown:
            raise ValueError(f"unknown --modes {', '.join(unknown)}: choose from {', '.join(modes)}")

    @classmethod
    def quick_settings(cls, **kw) -> BenchSettings:
        """A run of a few minutes: few prompts, short outputs, the sweeps' end points."""
        base = dict(n_prompts=4, max_new_tokens=10, repeats=2, block_length=8, block_lengths=(4, 8),
                    thresholds=(0.5, 0.9), threshold_block_lengths=(8,), batch_sizes=(1, 4),
                    dtype_sweep_modes=("ar", "hf"), sol_prompts=1, sol_budget=64, cost_tokens=(1, 4, 8, 16, 32),
                    cost_batch_sizes=(1,), cost_repeats=3, quick=True)
        base.update(kw)
        return cls(**base)


def plan_configs(s: BenchSettings) -> list[tuple[BenchConfig, set[str]]]:
    """Every configuration with the sweeps it belongs to, in run order (spec at the largest block runs
    before spec at block_length="auto", which reads its acceptance lengths). The first dtype is the
    reference; the dtype sweep repeats the main comparison in every dtype."""
    plan: dict[BenchConfig, set[str]] = {}

    def add(cfg: BenchConfig, sweep: str) -> None:
        if cfg.mode in s.modes or cfg.mode in ("ar", "hf"):
            plan.setdefault(cfg, set()).add(sweep)

    def block_cfg(mode: str, L, b: int = 1, dtype: str = "fp32") -> BenchConfig:
        thr = s.threshold if mode == "diffusion" else None
        return BenchConfig(mode, L, thr, b, dtype)

    fp = s.dtypes[0]
    add(BenchConfig("ar", dtype=fp), "main")
    if s.hf_baseline:
        add(BenchConfig("hf", dtype=fp), "main")
    add(block_cfg("diffusion", s.block_length, dtype=fp), "main")
    for L in s.block_lengths:
        add(block_cfg("spec", L, dtype=fp), "block")
    add(block_cfg("spec", "auto", dtype=fp), "main")
    add(block_cfg("spec-quadratic", s.quadratic_block_length, dtype=fp), "main")
    for L in s.block_lengths:
        add(block_cfg("diffusion", L, dtype=fp), "block")
    for L in s.threshold_block_lengths:
        for thr in s.thresholds:
            add(BenchConfig("diffusion", L, thr, 1, fp), "threshold")
    for b in s.batch_sizes:
        add(BenchConfig("ar", batch_size=b, dtype=fp), "batch")
        add(block_cfg("diffusion", s.block_length, b, fp), "batch")
        add(block_cfg("spec", "auto", b, fp), "batch")
    if s.compiled:  # compiled decode graphs (minutes of compiling per dtype), batch 1
        for dtype in s.dtypes:
            add(BenchConfig("ar", dtype=dtype, kernels="compiled"), "kernels")
            add(BenchConfig("spec", s.block_length, None, 1, dtype, "compiled"), "kernels")
    for dtype in s.dtypes:  # the main comparison again in each dtype ("auto" reuses fp32's acceptance)
        for cfg in [c for c, tags in plan.items() if "main" in tags and c.dtype == fp]:
            if s.dtype_sweep_modes is None or cfg.mode in s.dtype_sweep_modes:
                add(replace(cfg, dtype=dtype), "dtype")
    return list(plan.items())


# ---------------------------------------------------------------------------------------------
# measuring one configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    config: BenchConfig
    sweeps: list[str]
    resolved_block_length: int | None
    tokens_per_s: list[float]  # one per repeat
    generated_tokens: int
    forwards: int  # forwards a row saw, summed over rows (TPF = generated / forwards)
    model_calls: int  # forwards actually run (a batched call serves all its rows)
    acceptance_lengths: list[int]
    outputs: list[list[int]] = field(repr=False)
    quality: dict = field(default_factory=dict)
    speedup_vs_ar: float | None = None
    sol_fraction: float | None = None
    warmup_s: float | None = None  # compiled kernels: the untimed calls that compile (or load) every graph

    @property
    def tokens_per_s_median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def tpf(self) -> float | None:
        return self.generated_tokens / self.forwards if self.forwards else None

    @property
    def acceptance_mean(self) -> float | None:
        a = self.acceptance_lengths
        return sum(a) / len(a) if a else None

    def to_dict(self) -> dict:
        hist: dict[int, int] = {}
        for a in self.acceptance_lengths:
            hist[a] = hist.get(a, 0) + 1
        return {
            "label": self.config.label, "config": asdict(self.config), "sweeps": self.sweeps,
            "block_length": self.resolved_block_length,
            "tokens_per_s": {"median": self.tokens_per_s_median, "min": min(self.tokens_per_s),
                             "max": max(self.tokens_per_s), "repeats": self.tokens_per_s},
            "generated_tokens": self.generated_tokens, "forwards": self.forwards, "model_calls": self.model_calls,
            "tpf": self.tpf, "acceptance_length_mean": self.acceptance_mean,
            "acceptance_length_histogram": dict(sorted(hist.items())),
            "quality": self.quality, "speedup_vs_ar": self.speedup_vs_ar, "sol_fraction": self.sol_fraction,
            "warmup_s": self.warmup_s,
        }


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def _generate_kwargs(cfg: BenchConfig, L: int | None, s: BenchSettings) -> dict:
    kw = dict(mode=cfg.mode, max_new_tokens=s.max_new_tokens, ignore_eos=s.ignore_eos, temperature=0.0)
    if L is not None:
        kw["block_length"] = L
    if cfg.threshold is not None:
        kw["threshold"] = cfg.threshold
    return kw


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def measure_tridlm(model, cfg: BenchConfig, L: int | None, prompt_ids: list[list[int]],
                   s: BenchSettings) -> ConfigResult:
    kw = _generate_kwargs(cfg, L, s)
    batches = _chunks(prompt_ids, cfg.batch_size)

    def call(batch, **over):
        return model.generate(batch if len(batch) > 1 else batch[0], **{**kw, **over})

    t0 = time.perf_counter()
    call(batches[0], max_new_tokens=min(4, s.max_new_tokens))  # warm-up: allocator, kernels, caches
    if cfg.kernels == "compiled":  # every shape the timed runs will meet compiles here, untimed
        for batch in batches:
            call(batch)
    warmup_s = time.perf_counter() - t0 if cfg.kernels == "compiled" else None
    rates, outputs, acc = [], [], []
    tokens = forwards = calls = 0
    for rep in range(s.repeats):
        n_tok, wall = 0, 0.0
        for batch in batches:
            _sync(model)
            t0 = time.perf_counter()
            res = call(batch)
            _sync(model)
            wall += time.perf_counter() - t0
            n_tok += res.metrics.generated_tokens
            if rep == 0:
                outputs += [r.ids for r in res.rows]
                forwards += res.metrics.row_forwards
                calls += res.metrics.forwards
                acc += res.metrics.acceptance_lengths
        tokens = tokens or n_tok
        rates.append(n_tok / wall)
    return ConfigResult(cfg, [], L, rates, tokens, forwards, calls, acc, outputs, warmup_s=warmup_s)


def measure_baseline(generate: Callable, cfg: BenchConfig, prompt_ids: list[list[int]], s: BenchSettings,
                     eos: int | None) -> ConfigResult:
    """Another engine, AR greedy at batch 1: `generate(ids, max_new_tokens, eos, ignore_eos)` -> (ids, seconds)."""
    generate(prompt_ids[0], min(4, s.max_new_tokens), eos, s.ignore_eos)  # warm-up
    rates, outputs = [], []
    for rep in range(s.repeats):
        n_tok, wall = 0, 0.0
        for ids in prompt_ids:
            out, dt = generate(ids, s.max_new_tokens, eos, s.ignore_eos)
            n_tok += len(out)
            wall += dt
            if rep == 0:
                outputs.append(out)
        rates.append(n_tok / wall)
    n = sum(len(o) for o in outputs)
    return ConfigResult(cfg, [], None, rates, n, n, n, [], outputs)


# ---------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------
def agreement(out: list[int], ref: list[int]) -> float:
    """Fraction of positions where `out` equals the AR greedy reference (over the longer of the two)."""
    n = max(len(out), len(ref))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(out, ref, strict=False)) / n


@torch.no_grad()
def ar_nll(judge, prompt: list[int], out: list[int]) -> tuple[float, int]:
    """(summed negative log-likelihood of `out` given `prompt` under the causal pattern, token count)."""
    if not out:
        return 0.0, 0
    ids = torch.tensor([prompt + out], device=judge.device)
    at = torch.arange(len(prompt) - 1, len(prompt) + len(out) - 1, device=judge.device)[None]
    logits = judge(ids, logits_at=at)[0].float()  # causal logit at i predicts token i + 1
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(out, device=judge.device)[:, None])
    return float(-lp.sum()), len(out)


def quality(result: ConfigResult, prompts: list[Prompt], prompt_ids, reference, judge, tokenizer) -> dict:
    q: dict = {}
    graded = [(p, o) for p, o in zip(prompts, result.outputs, strict=True) if p.kind == "gsm8k" and p.answer]
    if graded and tokenizer is not None:
        correct = sum(is_correct(tokenizer.decode(o), p.answer) for p, o in graded)
        q["gsm8k_accuracy"] = correct / len(graded)
        q["gsm8k_graded"] = len(graded)
    if reference is not None:
        q["ar_agreement"] = sum(agreement(o, r) for o, r in zip(result.outputs, reference, strict=True)) / len(
            reference)
        q["identical_to_ar"] = sum(o == r for o, r in zip(result.outputs, reference, strict=True))
    nll = [ar_nll(judge, p, o) for p, o in zip(prompt_ids, result.outputs, strict=True)]
    n = sum(k for _, k in nll)
    q["ar_nll"] = sum(v for v, _ in nll) / n if n else None
    return q


def model_in_dtype(model, dtype: str):
    fmt = dtype if dtype in WEIGHT_ONLY else "float"
    if DTYPES[dtype] == model.dtype and model.weight_format == fmt:
        return model
    return _copy(model).to(DTYPES[dtype]).set_weight_format(fmt).eval()


def _copy(model):
    tok, model.tokenizer = model.tokenizer, None  # the tokenizer is shared, not copied
    try:
        other = copy.deepcopy(model)
    finally:
        model.tokenizer = tok
    other.tokenizer = tok
    return other


def run_configs(model, prompts: list[Prompt], s: BenchSettings, log: Callable[[str], None] = print,
                resolve_auto: Callable | None = None) -> list[ConfigResult]:
    """Measure every planned configuration; `resolve_auto(model, results, batch)` picks L for "auto"."""
    from .hf_baseline import hf_generate, to_transformers, transformers_available

    tokenizer = model.tokenizer
    prompt_ids = [p.encode(tokenizer) for p in prompts]
    plan = plan_configs(s)
    hf_ok = transformers_available()
    if s.hf_baseline and not hf_ok:
        log("transformers is not installed: no transformers baseline")
    results: list[ConfigResult] = []
    done: dict[tuple, ConfigResult] = {}
    for dtype in s.dtypes:
        m = model_in_dtype(model, dtype)
        hf = compiled = None
        for cfg, sweeps in plan:
            if cfg.dtype != dtype or (cfg.mode == "hf" and (not hf_ok or dtype in WEIGHT_ONLY)):
                continue  # transformers has no int8/int4 path of ours to compare with
            L = cfg.block_length
            if L == "auto":
                L = resolve_auto(m, results, cfg.batch_size) if resolve_auto else 32
            key = (cfg.mode, L, cfg.threshold, cfg.batch_size, cfg.dtype, cfg.kernels)
            t0 = time.perf_counter()
            if key in done:  # "auto" landed on a block length already measured
                r = replace(done[key], config=cfg, sweeps=sorted(sweeps), tokens_per_s=list(done[key].tokens_per_s))
            elif cfg.mode == "hf":
                hf = hf or to_transformers(m)
                r = measure_baseline(partial(hf_generate, hf), cfg, prompt_ids, s, m.config.eos_token_id)
            elif cfg.kernels == "compiled":
                if compiled is None:  # its own copy: the graphs route its decode widths (compiling is logged)
                    compiled = _copy(m).compile_decode(tokens=(1, s.block_length))
                r = measure_tridlm(compiled, cfg, L, prompt_ids, s)
            else:
                r = measure_tridlm(m, cfg, L, prompt_ids, s)
            r.sweeps = sorted(sweeps)
            done.setdefault(key, r)
            results.append(r)
            log(f"  {cfg.label:<32} {r.tokens_per_s_median:8.2f} tok/s  TPF {r.tpf or 0:5.2f}  "
                f"({time.perf_counter() - t0:.0f} s)")
        del hf, m, compiled
    results += _llama_cpp_results(model, prompt_ids, s, log)
    # quality, against AR greedy at the same dtype (batch 1)
    ar_runs = [r for r in results if r.config.mode == "ar"]
    refs = {r.config.dtype: r.outputs for r in ar_runs if r.config.batch_size == 1 and r.config.kernels == "eager"}
    # llama.cpp runs the GGUF's weights, which tridlm holds in fp32: its reference is fp32 AR
    refs.update({q: refs.get("fp32") for q in s.llama_cpp_quants})
    # speedups are over AR with the same dtype and kernels: compiled self-speculation against compiled AR
    ar_rate = {(r.config.dtype, r.config.batch_size, r.config.kernels): r.tokens_per_s_median for r in ar_runs}
    for r in results:
        r.quality = quality(r, prompts, prompt_ids, refs.get(r.config.dtype), model, tokenizer)
        if r.config.dtype != "fp32" and refs.get("fp32") is not None:  # what a narrower type changes
            r.quality["agreement_with_fp32_ar"] = sum(
                agreement(o, ref) for o, ref in zip(r.outputs, refs["fp32"], strict=True)) / len(refs["fp32"])
        base = ar_rate.get((r.config.dtype, r.config.batch_size if r.config.mode not in BASELINES else 1,
                            r.config.kernels))
        r.speedup_vs_ar = r.tokens_per_s_median / base if base else None
    return results


def _llama_cpp_results(model, prompt_ids: list[list[int]], s: BenchSettings, log) -> list[ConfigResult]:
    """llama.cpp on the model's GGUF in each of `s.llama_cpp_quants`, when it can run here."""
    from . import llama_cpp

    if not s.llama_cpp:
        return []
    if s.gguf is None:
        log("llama.cpp: no GGUF for this model (pass one as BenchSettings.gguf): no llama.cpp anchor")
        return []
    if not llama_cpp.available():
        log(f"llama-cpp-python is not installed: no llama.cpp anchor (install it with: {llama_cpp.INSTALL_HINT})")
        return []
    out = []
    eos = model.config.eos_token_id
    for quant in s.llama_cpp_quants:
        t0 = time.perf_counter()
        runner = llama_cpp.make_runner(s.gguf, quant, torch.get_num_threads())
        cfg = BenchConfig("llama.cpp", dtype=quant)
        r = measure_baseline(runner.generate, cfg, prompt_ids, s, eos)
        r.sweeps = ["main"]
        out.append(r)
        log(f"  {cfg.label:<32} {r.tokens_per_s_median:8.2f} tok/s  ({time.perf_counter() - t0:.0f} s)")
        del runner
    return out
