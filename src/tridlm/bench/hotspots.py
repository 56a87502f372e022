"""Where decoding time goes: time inside the model's forward per attention pattern, the top operators, peak RSS."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import torch

_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
                "stderr=subprocess.DEVNULL).returncode; "
                "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def forward_breakdown(model, run: Callable[[], object]) -> dict:
    """Wall time of `run()`, and the calls and seconds inside `model.forward` per attention pattern
    ("causal": prefill, AR steps, verify and commit passes; "block": diffusion drafts and denoising)."""
    by: dict[str, list[float]] = {}
    start = [0.0, "causal"]

    def pre(_module, args, kwargs):
        p = kwargs.get("pattern", args[3] if len(args) > 3 else "causal")
        start[:] = [time.perf_counter(), p if isinstance(p, str) else "explicit mask"]

    def post(_module, _args, _kwargs, _out):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        calls_seconds = by.setdefault(start[1], [0, 0.0])
        calls_seconds[0] += 1
        calls_seconds[1] += time.perf_counter() - start[0]

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.register_forward_hook(post, with_kwargs=True)
    try:
        t0 = time.perf_counter()
        run()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    finally:
        h1.remove()
        h2.remove()
    inside = sum(v[1] for v in by.values())
    return {"wall_s": total, "forward_s": inside, "forward_share": inside / total if total else None,
            "by_pattern": {k: {"calls": int(v[0]), "seconds": v[1]} for k, v in by.items()}}


def top_ops(run: Callable[[], object], k: int = 12, cuda: bool = False) -> list[dict]:
    """The `k` operators with the most self time while `run()` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        run()
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:k]
    return [{"op": e.key, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
            for e in rows]


def generate_peak_rss(model_path, prompt: str = "Once upon a time", max_new_tokens: int = 32,
                      mode: str = "ar", timeout: float = 900) -> dict:
    """Peak resident memory of one `tridlm generate` process (bytes; Linux reports ru_maxrss in KiB)."""
    cmd = [sys.executable, "-m", "tridlm", "generate", str(model_path), prompt, "--mode", mode,
           "--max-new-tokens", str(max_new_tokens)]
    out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True, timeout=timeout)
    rc, kib = out.stdout.split()
    scale = 1 if sys.platform == "darwin" else 1024
    return {"command": " ".join(["tridlm", *cmd[3:]]), "exit_code": int(rc), "peak_rss_bytes": int(kib) * scale}
