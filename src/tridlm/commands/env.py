"""`tridlm env`: the machine as tridlm sees it -- the first thing a bug or speed report should carry."""

from __future__ import annotations

import json

HELP = """\
Prints the CPU and the vector ISA torch's kernels dispatch to, the CPU flags that change which
kernels run, threads, the torch build, accelerators, the dtype and kernels tridlm uses by default,
and tridlm's cache folder with its size. fp32 results differ in their last bits between ISAs and
thread counts (README, "What is exact"); speeds differ by 2x and more."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="print the machine, torch build and cache as tridlm sees them",
                              description=HELP)
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads to report for (default: torch's)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from tridlm.machine import environment_report

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    report["cache_bytes"] = f"{report['cache_bytes'] / 1e6:.1f} MB"
    for key, value in report.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        print(f"{key:<22} {value}")
    return 0
