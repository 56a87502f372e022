"""`tridlm env`: the machine as tridlm sees it -- the first thing a bug or speed report should carry."""

from __future__ import annotations

import json
import os
from pathlib import Path

HELP = """\
Prints the CPU and the vector ISA torch's kernels dispatch to, the CPU flags that change which
kernels run, threads, the torch build, accelerators, the dtype and kernels tridlm uses by default,
and tridlm's cache folder with its size. fp32 results differ in their last bits between ISAs and
thread counts (README, "What is exact"); speeds differ by 2x and more."""

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "TRIDLM_CACHE",
            "XDG_CACHE_HOME", "TRIDLM_TEST_THREADS", "TRIDLM_NATIVE", "CXX")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="print the machine, torch build and cache as tridlm sees them",
                              description=HELP)
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads to report for (default: torch's)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch  # here, not at the top: every command's module loads for `tridlm --help`

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


def _folder_size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def environment_report() -> dict:
    """Everything `tridlm env` prints, as one dict (JSON with --json)."""
    import torch

    from tridlm.fusion import int4_available, int8_available
    from tridlm.machine import cache_root, default_device, machine_info

    device = default_device()
    root = cache_root()
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    report = {
        "tridlm": _version(),
        **machine_info(device),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "openmp": torch.backends.openmp.is_available(),
        "cuda": torch.cuda.is_available(),
        "default_device": device,
        "default_dtype": "the checkpoint's (float32 for the default model); --dtype overrides",
        "kernels": "eager PyTorch (ATen CPU kernels at the ISA above); q/k/v and gate/up fused at inference",
        "int8_weight_only": int8_available(device),
        "int4_weight_only": int4_available(device),
        "tridlm_products": _native_state(),
        "cache": str(root),
        "cache_bytes": _folder_size(root) if root.is_dir() else 0,
        "cache_entries": entries,
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    return report


def _native_state() -> str:
    """tridlm.native's kernels: whether they load here (building them once if needed), or why not."""
    from tridlm import native

    reason = native.unavailable()
    if reason:
        return f"unavailable: {reason}"
    return "available (bf16 and int8 weight products, attention over a bf16 KV cache; narrow forwards)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tridlm")
    except PackageNotFoundError:
        return "unknown"
