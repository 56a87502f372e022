"""Benchmark outputs: a Markdown report, the JSON record, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

PLOTS = ("tpf_vs_quality.png", "acceptance_histogram.png", "tokens_per_s_vs_block_length.png", "cost_profile.png")


def record(out: dict, path: str | None = None) -> None:
    """A script's results: as JSON on stdout and, given a path, in that file."""
    print(json.dumps(out, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def _f(x, fmt="{:.2f}", none="–") -> str:
    return none if x is None else fmt.format(x)


def _rate(r) -> str:
    t = r["tokens_per_s"]
    return f"{t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f})"


def _row(r) -> str:
    q = r["quality"]
    gsm = _f(q.get("gsm8k_accuracy"), "{:.0%}") + (f" of {q['gsm8k_graded']}" if q.get("gsm8k_graded") else "")
    return (f"| {r['label']} | {_rate(r)} | {_f(r['speedup_vs_ar'])}× | {r['generated_tokens']} | {r['forwards']} "
            f"| {_f(r['tpf'])} | {_f(r['acceptance_length_mean'])} | {gsm} | {_f(q.get('ar_agreement'), '{:.1%}')} "
            f"| {_f(q.get('ar_nll'), '{:.3f}')} |")


HEADER = ("| configuration | tokens/s median (min–max) | vs AR | tokens | forwards | TPF | acceptance | GSM8K "
          "| agreement with AR | AR-judged NLL |\n|---|---|---|---|---|---|---|---|---|---|")


def _table(rows) -> list[str]:
    return [HEADER, *(_row(r) for r in rows)] if rows else ["(none)"]


def markdown(rep: dict, plot_prefix: str = "") -> str:
    res = rep["results"]
    m, s = rep["machine"], rep["settings"]
    by_sweep = {k: [r for r in res if k in r["sweeps"]]
                for k in ("main", "block", "threshold", "batch", "dtype", "kernels")}
    where = m.get("gpu") or m["cpu"] + (f" ({m['cpu_isa']})" if m.get("cpu_isa") else "")
    L = [
        f"Command: `{rep['command']}`",
        "",
        f"Machine: {where}; {m['cpu_count']} CPU cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB RAM; {m['platform']}; Python {m['python']}, torch {m['torch']}. Load average "
        f"{_f((rep.get('load_average_start') or [None])[0])} at the start, "
        f"{_f((rep.get('load_average_end') or [None])[0])} at the end.",
        "",
        *([f"llama.cpp: {rep['llama_cpp']['package']}, built with {rep['llama_cpp']['build']}; the GGUF "
           f"`{rep['llama_cpp']['gguf']}` and its Q8_0 / BF16 copies made with llama.cpp's quantize call "
           "(the same weights tridlm runs, dequantized).", ""] if rep.get("llama_cpp") else []),
        f"Model: `{rep['model']['path']}` ({rep['model']['parameters'] / 1e6:.1f} M parameters). "
        f"Prompts: {len(rep['prompts'])} from `{s['prompts']}`; {s['max_new_tokens']} new tokens at most"
        f"{' (EOS ignored)' if s['ignore_eos'] else ', stopping at EOS'}; greedy; {s['repeats']} timed repeats "
        f"after a warm-up. Run took {rep['wall_time_s']:.0f} s.",
        "",
        "tokens/s counts generated tokens only, over the wall time of the `generate` calls (prefill included). "
        "TPF = generated tokens / decode forwards a row saw (draft and verify passes both count). Acceptance "
        "= tokens emitted per verify (accepted drafts + bonus). Agreement = share of positions equal to AR "
        "greedy at the same dtype. AR-judged NLL = mean negative log-likelihood per generated token under the "
        "fp32 model decoding causally.",
        "",
        "### All modes side by side",
        "",
        *_table(by_sweep["main"]),
        "",
    ]
    if rep.get("targets"):
        L += ["### Speed targets", "", "| target | measured | met |", "|---|---|---|"]
        L += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in rep["targets"]]
        L.append("")
    for key, title in (("block", "Block length sweep (batch 1)"), ("threshold", "Threshold sweep (diffusion)"),
                       ("batch", "Batch size sweep"), ("dtype", "dtype sweep"),
                       ("kernels", "Compiled decode graphs (batch 1)")):
        if by_sweep[key]:
            L += [f"### {title}", "", *_table(by_sweep[key]), ""]
        if key == "kernels" and by_sweep[key]:
            warm = [f"{r['label']} {r['warmup_s']:.0f} s" for r in by_sweep[key] if r.get("warmup_s") is not None]
            if warm:
                L += ["Untimed warm-up of each compiled configuration (compiling its graphs, or loading them from "
                      "torch's cache on disk when an earlier run compiled them): " + ", ".join(warm) + ".", ""]
    L += _sol_section(rep)
    L += _auto_section(rep)
    L += _cost_section(rep)
    L += _roofline_section(rep)
    L += _hotspot_section(rep)
    L += ["### Plots", ""]
    L += [f"![{p}]({plot_prefix}{p})" for p in PLOTS]
    L.append("")
    return "\n".join(L)


def _sol_section(rep) -> list[str]:
    sol = rep.get("sol") or {}
    if not sol:
        return []
    s = rep["settings"]
    L = ["### Speed of light (spec §4.5)", "",
         f"Per block length, over {s['sol_prompts']} prompt(s) × {s['sol_blocks_per_prompt']} block(s) of the "
         f"model's own continuation (fp32). Blocks start as the samplers' do, `[AR next token, MASK × (L−1)]`. "
         f"The oracle target is serial denoising, one masked position per pass (TPF L/(L−1)); greedy parallel "
         f"acceptance commits every position whose argmax equals the target; dynamic "
         f"compaction (the SOL) binary-searches the largest confidence-ranked set whose commit still lets serial "
         f"decoding reach the target (safety checks capped at {s['sol_budget']} forwards per block). TPF = block "
         f"tokens / denoise passes (the paper's acceptance ratio); real TPF also counts each block's causal commit "
         f"pass. A sampler's fraction of SOL = its TPF (every forward counted) / SOL real TPF at the same block "
         f"length. SOL's reference is the serial diffusion output, self-speculation's is AR greedy.", "",
         "| block | oracle TPF | greedy TPF | SOL TPF | greedy real TPF | SOL real TPF | check forwards "
         "| blocks over budget | diffusion (τ) fraction of SOL | spec fraction of SOL |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for Lb, v in sorted(sol.items(), key=lambda kv: int(kv[0])):
        fr = [r for r in rep["results"] if r.get("block_length") == int(Lb) and r.get("sol_fraction")
              and r["config"]["batch_size"] == 1 and r["config"]["dtype"] == "fp32"]
        diff = ", ".join(f"{r['sol_fraction']:.0%} (τ={r['config']['threshold']:g})" for r in fr
                         if r["config"]["mode"] == "diffusion") or "–"
        spec = ", ".join(f"{r['sol_fraction']:.0%}" for r in fr if r["config"]["mode"] == "spec"
                         and r["config"]["block_length"] != "auto") or "–"
        L.append(f"| {Lb} | {v['oracle_tpf']:.2f} | {v['greedy_tpf']:.2f} | {v['sol_tpf']:.2f} | "
                 f"{v['greedy_real_tpf']:.2f} | {v['sol_real_tpf']:.2f} | {v['check_forwards']} | "
                 f"{v['budget_exhausted_blocks']}/{v['blocks']} | {diff} | {spec} |")
    return L + [""]


def _auto_section(rep) -> list[str]:
    a = rep.get("auto_block_length")
    if not a:
        return []
    acc = a["acceptance_profile"]
    cost = (rep.get("cost_profiles") or {}).get("fp32")
    L = ["### block_length=\"auto\"", "",
         f"Acceptance profile: {int(sum(acc['counts']))} verify cycles at block {acc['block_length']} (mean "
         f"{_mean_acc(acc):.2f} tokens per cycle). Expected tokens/s(L) = E[min(A, L)] / (block pass(L) + causal "
         f"pass(L)) from the measured cost profile. Chosen: **L = {a['chosen']}**. The last two columns say how "
         "many tokens a draft+verify cycle must yield, on this device's cost profile, to equal AR (one causal "
         "1-token pass per token) and to reach 1.5x AR.", "",
         "| L | expected tokens/s | measured spec tokens/s | expected tokens per cycle | needed to equal AR "
         "| needed for 1.5x AR |", "|---|---|---|---|---|---|"]
    for Lb, v in a["expected_tokens_per_s"].items():
        meas = a["measured_tokens_per_s"].get(Lb, a["measured_tokens_per_s"].get(str(Lb)))
        exp_tokens = _expected_tokens(acc, int(Lb))
        need = _breakeven(cost, int(Lb)) if cost else None
        L.append(f"| {Lb} | {v:.2f} | {_f(meas)} | {exp_tokens:.2f} | {_need(need, int(Lb))} "
                 f"| {_need(None if need is None else 1.5 * need, int(Lb))} |")
    return L + [""]


def _need(x: float | None, L: int) -> str:
    return "–" if x is None else f"{x:.2f}" + (" (more than L: out of reach)" if x > L else "")


def _expected_tokens(acc, L: int) -> float:
    n = sum(acc["counts"])
    return sum(sum(acc["counts"][k - 1:]) / n for k in range(1, L + 1))


def _breakeven(cost: dict, L: int) -> float | None:
    """Tokens per cycle at which draft(L) + verify(L) costs what AR pays for the same tokens."""
    from ..decoding.block_length import CostProfile

    prof = CostProfile.from_dict(cost)
    if 1 not in prof.batch_sizes:
        return None
    return (prof.latency("block", L) + prof.latency("causal", L)) / prof.latency("causal", 1)


def _mean_acc(acc) -> float:
    n = sum(acc["counts"])
    return sum((i + 1) * c for i, c in enumerate(acc["counts"])) / n if n else 0.0


def _cost_section(rep) -> list[str]:
    L = []
    for dtype, c in (rep.get("cost_profiles") or {}).items():
        L += [f"### Cost profile ({dtype}, {c['device']}, prefix {c['context']} tokens)", "",
              "Median ms per forward by tokens per forward (columns) for each pattern and batch size.", "",
              "| pattern, batch | " + " | ".join(str(t) for t in c["tokens"]) + " |",
              "|---|" + "---|" * len(c["tokens"])]
        for pat, rows in c["seconds"].items():
            for b, row in rows.items():
                L.append(f"| {pat}, {b} | " + " | ".join(f"{x * 1e3:.1f}" for x in row) + " |")
        L.append("")
    return L


def _roofline_section(rep) -> list[str]:
    roof = rep.get("roofline") or {}
    if not roof:
        return []
    bw = rep["copy_bandwidth_bytes_per_s"]
    L = ["### Roofline (AR, batch 1)", "",
         f"Measured copy bandwidth: {bw / 1e9:.1f} GB/s (read + write of a 256 MiB buffer). Bytes per token = "
         "weights read once (a tied embedding whole, an untied one a row) + KV cache at the mean context.", "",
         "| configuration | tokens/s | MB per token | achieved GB/s | fraction of copy bandwidth "
         "| tokens/s at full bandwidth |", "|---|---|---|---|---|---|"]
    for label, r in roof.items():
        mb = (r["weight_bytes"] + r["kv_bytes"]) / 1e6
        L.append(f"| {label} | {r['tokens_per_second']:.2f} | {mb:.1f} | {r['achieved_bytes_per_s'] / 1e9:.2f} | "
                 f"{r['fraction']:.0%} | {r['ceiling_tokens_per_second']:.1f} |")
    return L + [""]


def _hotspot_section(rep) -> list[str]:
    h = rep.get("hotspots") or {}
    L = []
    for key, v in h.items():
        split = ", ".join(f"{k}: {p['calls']} calls, {p['seconds']:.2f} s" for k, p in v["by_pattern"].items())
        if v["mode"] == "spec":
            L += [f"### Where self-speculation time goes (L={v['block_length']}, {v['new_tokens']} tokens, fp32)", "",
                  f"{v['wall_s']:.2f} s in all; inside `model.forward`: {split} (block = drafts, causal = prefill "
                  f"and verify passes); {1 - v['forward_share']:.0%} outside the forward.", ""]
            continue
        L += [f"### Where AR time goes ({key}, {v['new_tokens']} tokens)", "",
              f"{v['forward_share']:.0%} of the wall time is inside `model.forward` "
              f"({v['forward_s']:.2f} of {v['wall_s']:.2f} s; {split}); the rest is the decode loop around it. "
              "Top operators by self time (torch.profiler):", "",
              "| operator | self ms | share | calls |", "|---|---|---|---|"]
        L += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.0%} | {o['calls']} |" for o in v["top_ops"]]
        L.append("")
    rss = rep.get("generate_rss")
    if rss and rss.get("peak_rss_bytes"):
        L += [f"Peak RSS of `{rss['command']}`: {rss['peak_rss_bytes'] / 1e9:.2f} GB (exit code "
              f"{rss['exit_code']}).", ""]
    elif rss and rss.get("error"):
        L += [f"Peak RSS of `tridlm generate` not measured: {rss['error']}", ""]
    return L


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def plots(rep: dict, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    res = rep["results"]
    fp = rep["settings"]["dtypes"][0]
    written = []

    # TPF against quality across thresholds, one line per block length
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    diff = [r for r in res if r["config"]["mode"] == "diffusion" and r["config"]["batch_size"] == 1
            and r["config"]["dtype"] == fp and r["tpf"]]
    for Lb in sorted({r["block_length"] for r in diff}):
        pts = sorted((r for r in diff if r["block_length"] == Lb), key=lambda r: r["config"]["threshold"])
        for ax, key in zip(axes, ("ar_agreement", "ar_nll"), strict=True):
            xs = [r["tpf"] for r in pts]
            ys = [r["quality"].get(key) for r in pts]
            ax.plot(xs, ys, "o-", label=f"diffusion L={Lb}")
            for r, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(f"τ={r['config']['threshold']:g}", (x, y), fontsize=7)
    for r in res:
        if r["config"]["mode"] in ("ar", "spec", "spec-quadratic") and r["config"]["batch_size"] == 1 \
                and r["config"]["dtype"] == fp and r["tpf"] and "main" in r["sweeps"]:
            for ax, key in zip(axes, ("ar_agreement", "ar_nll"), strict=True):
                ax.plot([r["tpf"]], [r["quality"].get(key)], "s", label=r["label"])
    axes[0].set(xlabel="tokens per forward", ylabel="token agreement with AR greedy", title="TPF vs quality")
    axes[1].set(xlabel="tokens per forward", ylabel="AR-judged NLL per token (lower is better)")
    axes[0].legend(fontsize=7)
    written.append(_save(fig, out_dir / PLOTS[0]))

    # acceptance-length histograms of self-speculation
    fig, ax = plt.subplots(figsize=(6, 4))
    spec = [r for r in res if r["config"]["mode"] in ("spec", "spec-quadratic") and r["config"]["batch_size"] == 1
            and r["config"]["dtype"] == fp and r["acceptance_length_histogram"]
            and r["config"]["block_length"] != "auto"]
    for r in spec:
        h = {int(k): v for k, v in r["acceptance_length_histogram"].items()}
        n = sum(h.values())
        ks = sorted(h)
        ax.plot(ks, [h[k] / n for k in ks], "o-", label=r["label"])
    ax.set(xlabel="acceptance length (tokens per verify)", ylabel="share of cycles", title="Acceptance lengths")
    if spec:
        ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / PLOTS[1]))

    # tokens/s against block length
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("diffusion", "spec"):
        pts = sorted(((r["block_length"], r["tokens_per_s"]) for r in res if r["config"]["mode"] == mode
                      and r["config"]["batch_size"] == 1 and r["config"]["dtype"] == fp
                      and "block" in r["sweeps"]), key=lambda p: p[0])
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1]["median"] for p in pts],
                        yerr=[[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]],
                        fmt="o-", capsize=3, label=mode)
    auto = rep.get("auto_block_length")
    if auto:
        xs = [int(k) for k in auto["expected_tokens_per_s"]]
        ax.plot(xs, list(auto["expected_tokens_per_s"].values()), "x--", label="spec, expected from cost profile")
    for r in res:
        if r["config"]["mode"] in ("ar", "hf") and r["config"]["batch_size"] == 1 and r["config"]["dtype"] == fp:
            ax.axhline(r["tokens_per_s"]["median"], ls=":", color="k" if r["config"]["mode"] == "ar" else "r",
                       label=r["label"])
    ax.set(xscale="log", xlabel="block length", ylabel="tokens/s (median, min–max)", title="tokens/s vs block length")
    ax.set_xticks(rep["settings"]["block_lengths"], [str(b) for b in rep["settings"]["block_lengths"]])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / PLOTS[2]))

    # the cost profile
    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype, c in (rep.get("cost_profiles") or {}).items():
        for pat, rows in c["seconds"].items():
            for b, row in rows.items():
                ax.plot(c["tokens"], [x * 1e3 for x in row], "o-", label=f"{pat} b={b} {dtype}")
    ax.set(xscale="log", yscale="log", xlabel="tokens per forward", ylabel="ms per forward",
           title="Forward latency (cost profile)")
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / PLOTS[3]))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(rep: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(rep, indent=1, default=str))
    plots(rep, out_dir)
    (out_dir / "bench.md").write_text(markdown(rep))
