"""`run_bench`: the whole benchmark in one process -- modes side by side, sweeps, SOL, cost profile,
block_length="auto", roofline, where the time goes -- and every output written."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..convert.smollm2 import smollm2_gguf_path
from ..decoding.block_length import (
    AcceptanceProfile,
    best_block_length,
    cached_cost_profile,
    load_acceptance_profile,
    save_acceptance_profile,
)
from ..machine import machine_info
from .prompts import load_prompts
from .runner import BenchSettings, ConfigResult, model_in_dtype, run_configs

# the speed targets (checked, never asserted)
TARGET_HF_RATIO = 2.5
TARGET_LLAMA_CPP_RATIO = 1.25  # AR vs llama.cpp at matched precision
TARGET_LOSSLESS_SPEEDUP = 1.3
TARGET_DRAFT_COST = 1.15  # a draft pass (with the drafter) vs a causal pass of the same width
TARGET_ROOFLINE = 0.60
TARGET_SPEC_SPEEDUP = 1.5
TARGET_RSS_BYTES = 1.5e9


def load_model(name, device, log: Callable[[str], None] = print):
    """(model, name for `tridlm generate`) from a model object, a checkpoint folder, "smollm2" (the
    converted base) or "default" (the default tri-mode model; the SmolLM2 base when it is not there)."""
    if not isinstance(name, (str, Path)):
        return name.eval(), getattr(name, "path", None)
    from ..default_model import locate_model

    source = locate_model(name, fallback=lambda e: log(f"the default model is not available ({e}); benchmarking "
                                                       "the SmolLM2 base conversion instead"))
    return source.load(device=device), "default" if source.kind == "default" else str(source.folder)


def _acceptance_from(results: list[ConfigResult], dtype: str) -> AcceptanceProfile | None:
    """Acceptance lengths of spec at the largest measured block, batch 1, this dtype."""
    spec = [r for r in results if r.config.mode == "spec" and r.config.batch_size == 1
            and r.config.dtype == dtype and r.acceptance_lengths and r.resolved_block_length]
    if not spec:
        return None
    r = max(spec, key=lambda r: r.resolved_block_length)
    return AcceptanceProfile.from_lengths(r.acceptance_lengths, r.resolved_block_length)


def run_bench(model_or_path, settings: BenchSettings | None = None, out_dir="bench-out", device=None,
              command: str | None = None, log: Callable[[str], None] = print, write: bool = True) -> dict:
    """Run the benchmark and (with write=True) write bench.json, bench.md and the PNG plots to `out_dir`."""
    from . import report as rep
    from .roofline import copy_bandwidth, roofline
    from .sol import sol_on_model

    s = settings or BenchSettings()
    t_start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, path = load_model(model_or_path, device, log)
    if model.tokenizer is None:
        raise ValueError("the benchmark needs a model with a tokenizer (its prompt sets are text)")
    if model.dtype != torch.float32:
        model = model.float()
    prompts = load_prompts(s.prompts, s.n_prompts)
    if s.llama_cpp and s.gguf is None and str(model_or_path) in ("default", "smollm2", "smollm2-base"):
        s = replace(s, gguf=str(smollm2_gguf_path()))  # the GGUF the default model's weights come from
    out = {"command": command or "", "settings": dict(s.__dict__), "model": {"path": path,
           "parameters": model.num_parameters(), "config": model.config.to_dict()},
           "machine": machine_info(model.device), "load_average_start": _loadavg(), "prompts": [p.id for p in prompts]}
    log(f"bench: {len(prompts)} prompts ({s.prompts}), {s.max_new_tokens} new tokens, {s.repeats} repeats, "
        f"on {out['machine']['cpu'] if model.device.type == 'cpu' else out['machine'].get('gpu')}")

    # 1. cost profile, measured on this device (fp32 here; other dtypes when "auto" needs them)
    t0 = time.perf_counter()
    costs = {"fp32": cached_cost_profile(model, tokens=s.cost_tokens, batch_sizes=s.cost_batch_sizes, refresh=True,
                                         repeats=s.cost_repeats, warmup=1)}
    log(f"cost profile: {time.perf_counter() - t0:.0f} s")

    def resolve_auto(m, results, batch) -> int:
        floats = {torch.float32: "fp32", torch.bfloat16: "bf16"}
        dtype = m.weight_format if m.weight_format != "float" else floats[m.dtype]
        acc = _acceptance_from(results, dtype) or _acceptance_from(results, "fp32")
        if acc is not None:
            save_acceptance_profile(m, acc)
        else:
            acc = load_acceptance_profile(m) or AcceptanceProfile.prior(max(s.block_lengths))
        if dtype not in costs:
            costs[dtype] = cached_cost_profile(m, tokens=s.cost_tokens, batch_sizes=(1,), repeats=s.cost_repeats,
                                               warmup=1)
        cost = costs[dtype]
        return best_block_length(acc, cost, s.block_lengths, batch if batch in cost.batch_sizes else 1)[0]

    # 2. every mode and sweep
    results = run_configs(model, prompts, s, log, resolve_auto)
    out["results"] = [r.to_dict() for r in results]

    # 3. block_length="auto": expected tokens/s per L against what spec measured at each L
    acc = _acceptance_from(results, "fp32")
    if acc is not None:
        best, table = best_block_length(acc, costs["fp32"], s.block_lengths)
        measured = {r.resolved_block_length: r.tokens_per_s_median for r in results
                    if r.config.mode == "spec" and r.config.batch_size == 1 and r.config.dtype == "fp32"}
        out["auto_block_length"] = {"chosen": best, "acceptance_profile": acc.to_dict(),
                                    "expected_tokens_per_s": table, "measured_tokens_per_s": measured}
    out["cost_profiles"] = {k: v.to_dict() for k, v in costs.items()}

    # 4. speed of light per block length, and the fraction of it each real sampler reaches (real TPF to
    #    real TPF: every forward counted on both sides)
    t0 = time.perf_counter()
    sol_ids = [p.encode(model.tokenizer) for p in prompts[: s.sol_prompts]]
    sols = {L: sol_on_model(model, sol_ids, L, s.sol_blocks_per_prompt, s.sol_budget) for L in s.block_lengths}
    out["sol"] = {L: v.to_dict() for L, v in sols.items()}
    for r, d in zip(results, out["results"], strict=True):
        L = r.resolved_block_length
        if L in sols and r.tpf:
            r.sol_fraction = d["sol_fraction"] = r.tpf / sols[L].sol_real_tpf
    log(f"speed of light: {time.perf_counter() - t0:.0f} s")

    # 5. roofline of AR batch 1 (and of transformers, for comparison)
    bw = copy_bandwidth(model.device)
    out["copy_bandwidth_bytes_per_s"] = bw
    roof = {}
    mean_prompt = statistics.mean(len(p.encode(model.tokenizer)) for p in prompts)
    for r in results:
        if r.config.mode in ("ar", "hf") and r.config.batch_size == 1 and r.config.dtype in ("fp32", "bf16"):
            ctx = mean_prompt + r.generated_tokens / len(prompts) / 2
            m = model_in_dtype(model, r.config.dtype)
            roof[r.config.label] = roofline(m, r.tokens_per_s_median, ctx, bw).to_dict()
    out["roofline"] = roof

    # 6. where the time goes in AR decoding, and the peak RSS of `tridlm generate`
    if s.profile:
        out["hotspots"] = _hotspots(model, prompts, s, results, log)
    if s.rss and path is not None:
        try:
            from .hotspots import generate_peak_rss

            out["generate_rss"] = generate_peak_rss(path, max_new_tokens=min(32, s.max_new_tokens))
        except Exception as e:  # the command belongs to another module; report, do not fail the run
            out["generate_rss"] = {"error": str(e)}
    if any(r.config.mode == "llama.cpp" for r in results):
        from . import llama_cpp

        out["llama_cpp"] = {"package": f"llama-cpp-python {llama_cpp.version()}", "gguf": s.gguf,
                            "build": f'CMAKE_ARGS="{llama_cpp.BUILD_FLAGS}"'}
    out["targets"] = targets(out)
    out["load_average_end"] = _loadavg()
    out["wall_time_s"] = time.perf_counter() - t_start
    if write:
        rep.write_all(out, out_dir)
        log(f"wrote {out_dir}/bench.md, bench.json and plots ({out['wall_time_s']:.0f} s in all)")
    return out


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _hotspots(model, prompts, s: BenchSettings, results: list[ConfigResult], log) -> dict:
    """AR per dtype: forward share and top operators. Self-speculation at its "auto" block: draft vs
    verify time, which with the acceptance length says where its tokens/s comes from."""
    from .hotspots import forward_breakdown, top_ops

    ids = prompts[0].encode(model.tokenizer)
    n = min(32, s.max_new_tokens)
    out = {}
    for dtype in s.dtypes:
        m = model_in_dtype(model, dtype)

        def run(m=m):
            return m.generate(ids, mode="ar", max_new_tokens=n, ignore_eos=True)

        run()  # warm
        share = forward_breakdown(m, run)
        ops = top_ops(run, cuda=m.device.type == "cuda")
        out[dtype] = {"mode": "ar", "new_tokens": n, **share, "top_ops": ops}
        log(f"AR {dtype}: {share['forward_share']:.0%} of decode wall time inside model.forward")
    auto = next((r for r in results if r.config.mode == "spec" and r.config.block_length == "auto"
                 and r.config.batch_size == 1 and r.config.dtype == s.dtypes[0]), None)
    if auto is not None:
        L = auto.resolved_block_length
        spec = forward_breakdown(model, lambda: model.generate(ids, mode="spec", block_length=L, max_new_tokens=n,
                                                               ignore_eos=True))
        out["spec"] = {"mode": "spec", "block_length": L, "new_tokens": n, **spec}
    return out


def targets(out: dict) -> list[dict]:
    """The issue's speed targets, each with the measured figure and whether it is met."""
    res = {r["label"]: r for r in out["results"]}
    t = []
    for kernels in ("", " compiled"):
        for dtype, quant in (("bf16", "BF16"), ("fp32", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_1")):
            ar, lc = res.get(f"ar b=1 {dtype}{kernels}"), res.get(f"llama.cpp b=1 {quant}")
            if ar and lc:
                ratio = ar["tokens_per_s"]["median"] / lc["tokens_per_s"]["median"]
                t.append({"target": f"AR batch 1 {dtype}{kernels} >= {TARGET_LLAMA_CPP_RATIO:g}x llama.cpp {quant}",
                          "measured": f"{ratio:.2f}x", "value": ratio, "met": ratio >= TARGET_LLAMA_CPP_RATIO})
    lossless = [r for r in out["results"] if r["config"]["mode"] in ("spec", "spec-quadratic")
                and r["config"]["batch_size"] == 1 and r["config"]["dtype"] == "fp32" and r.get("speedup_vs_ar")]
    if lossless:
        best = max(lossless, key=lambda r: r["speedup_vs_ar"])
        t.append({"target": f"best lossless mode >= {TARGET_LOSSLESS_SPEEDUP:g}x own AR (fp32, batch 1)",
                  "measured": f"{best['speedup_vs_ar']:.2f}x ({best['label']})", "value": best["speedup_vs_ar"],
                  "met": best["speedup_vs_ar"] >= TARGET_LOSSLESS_SPEEDUP})
    for dtype, c in (out.get("cost_profiles") or {}).items():
        b = c["seconds"]
        if "1" in b.get("block", {}) and 8 in c["tokens"]:
            i = c["tokens"].index(8)
            ratio = b["block"]["1"][i] / b["causal"]["1"][i]
            t.append({"target": f"a draft pass (8 tokens, {dtype}) <= {TARGET_DRAFT_COST:g}x a causal pass",
                      "measured": f"{ratio:.2f}x", "value": ratio, "met": ratio <= TARGET_DRAFT_COST})
    for dtype in ("fp32", "bf16"):
        for kernels in ("", " compiled"):  # against transformers eager, as users call it
            ar, hf = res.get(f"ar b=1 {dtype}{kernels}"), res.get(f"transformers b=1 {dtype}")
            if ar and hf:
                ratio = ar["tokens_per_s"]["median"] / hf["tokens_per_s"]["median"]
                t.append({"target": f"AR batch 1 {dtype}{kernels} >= {TARGET_HF_RATIO:g}x transformers generate",
                          "measured": f"{ratio:.2f}x", "value": ratio, "met": ratio >= TARGET_HF_RATIO})
        roof = out.get("roofline", {}).get(f"ar b=1 {dtype}")
        if roof:
            t.append({"target": f"AR batch 1 {dtype} >= {TARGET_ROOFLINE:.0%} of the bandwidth roofline",
                      "measured": f"{roof['fraction']:.0%}", "value": roof["fraction"],
                      "met": roof["fraction"] >= TARGET_ROOFLINE})
    auto = res.get("spec L=auto b=1 fp32")
    if auto and auto.get("speedup_vs_ar") is not None:
        same = auto["quality"].get("identical_to_ar"), len(out["prompts"])
        t.append({"target": f"spec at block_length=auto >= {TARGET_SPEC_SPEEDUP:g}x own AR tokens/s",
                  "measured": f"{auto['speedup_vs_ar']:.2f}x (L={auto['block_length']})",
                  "value": auto["speedup_vs_ar"], "met": auto["speedup_vs_ar"] >= TARGET_SPEC_SPEEDUP})
        t.append({"target": "spec output identical to AR (greedy)", "measured": f"{same[0]}/{same[1]} prompts",
                  "value": same[0], "met": same[0] == same[1]})
    rss = out.get("generate_rss", {})
    if rss.get("peak_rss_bytes"):
        t.append({"target": "peak RSS of tridlm generate <= 1.5 GB",
                  "measured": f"{rss['peak_rss_bytes'] / 1e9:.2f} GB", "value": rss["peak_rss_bytes"],
                  "met": rss["peak_rss_bytes"] <= TARGET_RSS_BYTES and rss.get("exit_code") == 0})
    return t

