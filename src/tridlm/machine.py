"""What machine this is, as far as tridlm's numbers depend on it: CPU and the ISA torch dispatches
to, threads, torch build, accelerators, and where tridlm caches things. `tridlm env` prints it (with
what tridlm's kernels can do here), the bench and eval records embed it, cost profiles are keyed by it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# CPU flags that change which kernels run (and so speed and the last bits of fp32 results)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


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
