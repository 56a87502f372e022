"""Benchmarks: every decoding mode side by side, sweeps, speed of light, cost profile, roofline.

    from tridlm.bench import BenchSettings, run_bench
    report = run_bench("path/to/checkpoint", BenchSettings.quick_settings(), out_dir="bench-out")

`resolve_auto_block_length(model)` is what `block_length="auto"` calls.
"""

from .cost_profile import AcceptanceProfile, CostProfile, best_block_length, resolve_auto_block_length
from .runner import BenchConfig, BenchSettings, plan_configs
from .suite import run_bench

__all__ = ["AcceptanceProfile", "BenchConfig", "BenchSettings", "CostProfile", "best_block_length", "plan_configs",
           "resolve_auto_block_length", "run_bench"]
