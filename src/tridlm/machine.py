"""What machine this is, as far as tridlm's numbers depend on it: CPU and the ISA torch dispatches
to, threads, torch build, accelerators, and where tridlm caches things. `tridlm env` prints it, the
bench and eval records embed it, cost profiles are keyed by it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .fusion import int4_available, int8_available

# CPU flags that change which kernels run (and so speed and the last bits of fp32 results)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "TRIDLM_CACHE",
            "XDG_CACHE_HOME", "TRIDLM_TEST_THREADS", "TRIDLM_NATIVE", "CXX")


def cache_root() -> Path:
    """`$TRIDLM_CACHE`, else `$XDG_CACHE_HOME/tridlm`, else `~/.cache/tridlm`."""
    if os.environ.get("TRIDLM_CACHE"):
        return Path(os.environ["TRIDLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tridlm"


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The KERNEL_FLAGS this CPU reports (empty where /proc/cpuinfo is not there)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in KERNEL_FLAGS if f in flags]


def cpu_isa() -> str:
    """The vector ISA torch's CPU kernels dispatch to here (e.g. AVX2, AVX512)."""
    return torch.backends.cpu.get_cpu_capability()


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(device) -> dict:
    """The record the bench and eval runs carry."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_name(), "cpu_isa": cpu_isa(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_gib": memory_gib(), "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
    from . import native

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
