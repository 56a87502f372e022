"""tridlm's own CPU kernels for narrow forwards: matrix products (`csrc/small_gemm.cpp`: bf16 weights
and int8 weight-only, bf16 activations, fp32 sums) and attention over a KV cache (`csrc/attention.cpp`).
Built once per machine with the system C++ compiler against the installed torch (a few seconds), kept
under `tridlm.machine.cache_root()/native/`, and loaded as the torch ops `torch.ops.tridlm.gemm_bf16`,
`gemm_int8` and `attend_bf16`, which torch.compile graphs call like any op; also a bf16 RMSNorm
(`csrc/rms_norm.cpp`), rotary embedding (`csrc/rope.cpp`), greedy picks over a vocabulary
(`csrc/argmax.cpp`) and a greedy diffusion pass's picks with their probabilities (`csrc/confidence.cpp`).
They need AVX-512 with BF16 dot products (AMD Zen 4, Intel Sapphire Rapids and later); where that, a
compiler or the build is missing, `unavailable()` says why and tridlm keeps torch's products.
`TRIDLM_NATIVE=0` turns them off. CPUs with AMX also get `torch.ops.tridlm.gemm_bf16_amx`
(`csrc/amx_gemm.cpp`: wide bf16 products on the same packed weights); `amx_unavailable()` says why not.

Weights are packed as [N/32, K/2, 32, 2]: tiles of 32 output rows, their inputs in pairs (`pack`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("small_gemm.cpp", "attention.cpp", "amx_gemm.cpp",
                                                                    "rms_norm.cpp", "argmax.cpp", "rope.cpp",
                                                                    "confidence.cpp"))
# included by the sources: part of their hash
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("bf16.h", "epilogue.h", "argmax.h", "rope.h"))
TILE_ROWS, TILE_COLS = 32, 2  # the packed layout's tile: output rows x inputs
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
AMX_FLAGS = ("amx_tile", "amx_bf16")
AMX_INPUTS = 32  # gemm_bf16_amx's inputs per tile step: it takes a multiple of this many
# the AMX instructions are only compiled in; they run only where amx_unavailable() is None
ARCH = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mamx-tile", "-mamx-bf16")

_reason: str | None = None  # why they are unavailable; "" once loaded
_tried = False
_amx_reason: str | None = None  # why gemm_bf16_amx is unavailable; "" once it ran


def unavailable() -> str | None:
    """Why tridlm's products cannot run in this process, or None when they are loaded (built on first call)."""
    global _reason, _tried
    if not _tried:
        _tried = True
        try:
            _reason = _load()
        except Exception as e:  # a failed build or load leaves torch's products, never a broken model
            _reason = f"loading tridlm's CPU kernels failed: {e}"
    return _reason or None


def loaded() -> bool:
    """Whether the kernels are loaded in this process already (asks nothing that would build them)."""
    return _tried and not _reason


def amx_unavailable() -> str | None:
    """Why gemm_bf16_amx cannot run in this process (no AMX, the OS refused the tile state), or None."""
    global _amx_reason
    if _amx_reason is None:
        missing = [f for f in AMX_FLAGS if f not in _cpu_flags()]
        if unavailable():
            _amx_reason = unavailable()
        elif missing:
            _amx_reason = f"this CPU lacks {', '.join(missing)}"
        else:
            try:
                torch.ops.tridlm.gemm_bf16_amx(torch.zeros(1, AMX_INPUTS, dtype=torch.bfloat16),
                                               pack(torch.zeros(TILE_ROWS, AMX_INPUTS, dtype=torch.bfloat16)))
                _amx_reason = ""
            except RuntimeError as e:
                _amx_reason = str(e).splitlines()[0]
    return _amx_reason or None


def amx_fits(inputs: int) -> bool:
    """Whether gemm_bf16_amx takes a product with this many inputs."""
    return inputs % AMX_INPUTS == 0


def fits(inputs: int) -> bool:
    """Whether a product with this many inputs has the packed layout's shape (outputs are padded)."""
    return inputs % TILE_COLS == 0


def pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] weights (bf16 values or int8 codes) in the kernels' layout [ceil(N/32), K/2, 32, 2], the rows
    past N zero (their outputs are cut off by the caller)."""
    n, k = w.shape
    if not fits(k):
        raise ValueError(f"a packed product needs an even number of inputs, got {k}")
    w = torch.cat([w, w.new_zeros(-n % TILE_ROWS, k)]) if n % TILE_ROWS else w
    return w.reshape(-1, TILE_ROWS, k // TILE_COLS, TILE_COLS).transpose(1, 2).contiguous()


def padded(n: int) -> int:
    """Rows of a packed [n, K] weight."""
    return n + (-n % TILE_ROWS)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def source_hash() -> str:
    """Changes whenever a kernel's source does (keys cached builds and measurements)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:16]


def _library_path(cxx: str) -> Path:
    from .machine import cache_root

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256((source_hash() + repr((torch.__version__, version, ARCH))).encode()).hexdigest()
    return cache_root() / "native" / f"tridlm_cpu-{key[:16]}.so"


def _build(cxx: str, out: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    libs = library_paths()
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", *ARCH,
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], *map(str, SOURCES), "-o", str(tmp),
           *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu"]
    print("building tridlm's CPU kernels (once per machine) ...", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cxx} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    tmp.replace(out)  # atomic: a concurrent process sees the whole library or none


def _load() -> str:
    if os.environ.get("TRIDLM_NATIVE", "1") == "0":
        return "turned off by TRIDLM_NATIVE=0"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found (install g++ or set CXX)"
    path = _library_path(cxx)
    if not path.exists():
        _build(cxx, path)
    torch.ops.load_library(str(path))

    @torch.library.register_fake("tridlm::gemm_bf16")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0] * TILE_ROWS)

    @torch.library.register_fake("tridlm::gemm_bf16_amx")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0] * TILE_ROWS)

    @torch.library.register_fake("tridlm::gemm_int8")
    def _(x, w, scale):
        return x.new_empty(x.shape[0], w.shape[0] * TILE_ROWS)

    @torch.library.register_fake("tridlm::rms_norm_bf16")
    def _(x, w, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("tridlm::rope_bf16")
    def _(q, k, cos, sin):
        return (q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2),
                k.new_empty(k.shape[0], k.shape[2], k.shape[1], k.shape[3]).transpose(1, 2))

    @torch.library.register_fake("tridlm::gemm_bf16_add_")
    def _(y, x, w, row_scale, scale):
        return y

    @torch.library.register_fake("tridlm::gemm_bf16_amx_add_")
    def _(y, x, w, row_scale, scale):
        return y

    @torch.library.register_fake("tridlm::gemm_bf16_amx_drafted")
    def _(x, w, n_base, b, row_scale, start, stop, scale):
        return x.new_empty(x.shape[0], n_base)

    @torch.library.register_fake("tridlm::argmax_rows")
    def _(x, banned):
        return x.new_empty(x.shape[:-1], dtype=torch.long)

    @torch.library.register_fake("tridlm::greedy_confidence")
    def _(x, banned):
        return x.new_empty(x.shape[:-1], dtype=torch.long), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("tridlm::kv_write")
    def _(k_cache, v_cache, lengths, k_new, v_new):
        return None

    @torch.library.register_fake("tridlm::attend_bf16")
    def _(q, k_cache, v_cache, lengths, k_new, v_new, mask, scale):
        b, h, t, d = q.shape
        return q.new_empty(b, t, h, d)

    return ""
