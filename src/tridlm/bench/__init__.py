"""Benchmarks: every decoding mode side by side, sweeps, speed of light, cost profile, roofline.

    from tridlm.bench import BenchSettings, run_bench
    report = run_bench("path/to/checkpoint", BenchSettings.quick_settings(), out_dir="bench-out")

The cost and acceptance profiles behind `block_length="auto"` live in `tridlm.decoding.block_length`.
"""

from .runner import BenchConfig, BenchSettings, plan_configs
from .suite import run_bench

__all__ = ["BenchConfig", "BenchSettings", "plan_configs", "run_bench"]
