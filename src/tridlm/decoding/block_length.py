"""Hardware cost profile and the block length that maximises expected self-speculation tokens/s.

A cost profile is forward latency measured on the current device as a function of tokens per forward
(1..64) and batch size, for the two passes self-speculation makes: a ``block`` pass that only reads the
prefix cache (the draft) and a ``causal`` pass that writes it (the verify). An acceptance profile is the
histogram of acceptance lengths (tokens emitted per draft+verify cycle, 1..L) observed at a large block.

Linear self-speculation at block L emits min(A, L) tokens per cycle, A being the acceptance length at
the large block (drafts of the first L positions do not depend on the ones after them, to first order):

    E[tokens | L] = sum_{k=1..L} P(A >= k)
    tokens/s(L)   = E[tokens | L] / (cost_block(L) + cost_causal(L))

Profiles are cached as JSON under ``$TRIDLM_CACHE`` (default ``~/.cache/tridlm``), keyed by device,
dtype, thread count and model shape (cost), or by the model's weights (acceptance).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..machine import cache_root, cpu_isa, cpu_name

TOKENS = (1, 2, 4, 8, 16, 32, 64)
BATCH_SIZES = (1, 4, 16)
CANDIDATES = (4, 8, 16, 32)
PATTERNS = ("block", "causal")
# Used only when no acceptance was ever measured for a model: each further draft token accepted with
# probability 0.8 (mean acceptance about 4.6 tokens at block 32).
PRIOR_ACCEPT_RATE = 0.8


def cache_dir() -> Path:
    """Profiles live in `profiles/` under tridlm's cache folder (`tridlm.machine.cache_root`)."""
    return cache_root() / "profiles"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({cpu_isa()}) x{torch.get_num_threads()} threads"


def shape_key(model) -> str:
    """What latency depends on: the architecture, dtype, device and threads -- not the weights' values."""
    cfg = model.config.to_dict()
    text = json.dumps({"cfg": cfg, "dtype": str(model.dtype), "weights": model.weight_format,
                       "device": device_name(model.device),
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_key(model) -> str:
    """What acceptance depends on: the weights. A digest of a few slices is enough to tell checkpoints apart."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    enc = model.encoder
    for t in (enc.embed_tokens.weight[-8:, :64], model.diffusion_head.weight[:8, :64],
              enc.layers[-1].mlp.down_proj.weight[:8, :64], enc.layers[0].self_attn.q_proj.weight[:8, :64]):
        # rounded to bf16 first: the fp32 and bf16 copies of one checkpoint share their acceptance profile
        h.update(t.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# cost profile
# ---------------------------------------------------------------------------------------------
@dataclass
class CostProfile:
    """Median seconds per forward: ms[pattern][batch] is a list aligned with `tokens`."""

    tokens: list[int]
    batch_sizes: list[int]
    seconds: dict[str, dict[int, list[float]]]
    context: int = 0
    device: str = ""
    dtype: str = ""
    key: str = ""

    def latency(self, pattern: str, tokens: int, batch: int = 1) -> float:
        """Seconds for one forward of `tokens` new tokens per row; linear between measured points."""
        row = self.seconds[pattern][batch]
        xs = self.tokens
        if tokens <= xs[0]:
            return row[0]
        i = next((i for i in range(1, len(xs)) if tokens <= xs[i]), len(xs) - 1)
        # linear within a segment; past the last point the last segment's slope continues
        x0, x1, y0, y1 = xs[i - 1], xs[i], row[i - 1], row[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = {p: {str(b): v for b, v in rows.items()} for p, rows in self.seconds.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CostProfile:
        d = dict(d)
        d["seconds"] = {p: {int(b): v for b, v in rows.items()} for p, rows in d["seconds"].items()}
        return cls(**d)


def _time_forward(model, ids, cache, pattern: str, prefix_len: int, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, cache=cache, pattern=pattern)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if pattern == "causal":
            cache.crop(prefix_len)  # the verify pass writes; undo it so every repeat sees the same prefix
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


@torch.no_grad()
def measure_cost_profile(model, tokens=TOKENS, batch_sizes=BATCH_SIZES, context: int = 128, repeats: int = 5,
                         warmup: int = 2) -> CostProfile:
    """Forward latency over a `context`-token prefix cache, for each pattern, batch size and token count."""
    dev = model.device
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    seconds: dict[str, dict[int, list[float]]] = {p: {} for p in PATTERNS}
    for b in batch_sizes:
        cache = model.new_cache(b, context + max(tokens))
        model(torch.randint(0, vocab, (b, context), generator=g).to(dev), cache=cache)
        for p in PATTERNS:
            seconds[p][b] = [
                _time_forward(model, torch.randint(0, vocab, (b, n), generator=g).to(dev), cache, p, context,
                              repeats, warmup)
                for n in tokens
            ]
    return CostProfile(list(tokens), list(batch_sizes), seconds, context, device_name(dev),
                       str(model.dtype).removeprefix("torch."), shape_key(model))


def cached_cost_profile(model, tokens=TOKENS, batch_sizes=(1,), refresh: bool = False, **kw) -> CostProfile:
    """The cost profile for this device and model shape: read from the cache, or measured and stored."""
    path = cache_dir() / f"cost-{shape_key(model)}.json"
    if path.is_file() and not refresh:
        prof = CostProfile.from_dict(json.loads(path.read_text()))
        if set(tokens) <= set(prof.tokens) and set(batch_sizes) <= set(prof.batch_sizes):
            return prof
    prof = measure_cost_profile(model, tokens=tokens, batch_sizes=batch_sizes, **kw)
    save_json(path, prof.to_dict())
    return prof


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # concurrent readers never see half a file


# ---------------------------------------------------------------------------------------------
# acceptance profile
# ---------------------------------------------------------------------------------------------
@dataclass
class AcceptanceProfile:
    """counts[a - 1] = cycles that emitted a tokens (1..block_length) at block `block_length`."""

    block_length: int
    counts: list[float] = field(default_factory=list)
    source: str = "measured"

    @classmethod
    def from_lengths(cls, lengths, block_length: int, source: str = "measured") -> AcceptanceProfile:
        counts = [0.0] * block_length
        for a in lengths:
            a = int(a)
            if not 1 <= a <= block_length:
                raise ValueError(f"acceptance length {a} is outside 1..{block_length}")
            counts[a - 1] += 1
        if not sum(counts):
            raise ValueError("no acceptance lengths given")
        return cls(block_length, counts, source)

    @classmethod
    def prior(cls, block_length: int = 32, rate: float = PRIOR_ACCEPT_RATE) -> AcceptanceProfile:
        # geometric: P(A >= k) = rate^(k-1), censored at the block length
        p = [rate ** (k - 1) - rate ** k for k in range(1, block_length)] + [rate ** (block_length - 1)]
        return cls(block_length, p, "prior")

    def survival(self, k: int) -> float:
        """P(A >= k)."""
        total = sum(self.counts)
        return sum(self.counts[k - 1:]) / total if k >= 1 else 1.0

    def expected_tokens(self, block_length: int) -> float:
        if block_length > self.block_length:
            raise ValueError(f"acceptance was observed at block {self.block_length}; it says nothing about "
                             f"block {block_length}")
        return sum(self.survival(k) for k in range(1, block_length + 1))

    def mean(self) -> float:
        return self.expected_tokens(self.block_length)

    def to_dict(self) -> dict:
        return asdict(self)


def acceptance_path(model) -> Path:
    return cache_dir() / f"acceptance-{weights_key(model)}.json"


def save_acceptance_profile(model, profile: AcceptanceProfile) -> Path:
    path = acceptance_path(model)
    save_json(path, profile.to_dict())
    return path


def load_acceptance_profile(model) -> AcceptanceProfile | None:
    path = acceptance_path(model)
    if not path.is_file():
        return None
    return AcceptanceProfile(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------
# the best block length
# ---------------------------------------------------------------------------------------------
def expected_tokens_per_second(block_length: int, acceptance: AcceptanceProfile, cost: CostProfile,
                               batch: int = 1) -> float:
    cycle = cost.latency("block", block_length, batch) + cost.latency("causal", block_length, batch)
    return acceptance.expected_tokens(block_length) / cycle


def best_block_length(acceptance: AcceptanceProfile, cost: CostProfile, candidates=CANDIDATES,
                      batch: int = 1) -> tuple[int, dict[int, float]]:
    """(best L, expected tokens/s per candidate L); candidates above the observed block are dropped."""
    usable = [L for L in candidates if L <= acceptance.block_length]
    if not usable:
        raise ValueError(f"no candidate block length is within the observed block {acceptance.block_length}")
    table = {L: expected_tokens_per_second(L, acceptance, cost, batch) for L in usable}
    return max(table, key=lambda L: (table[L], -L)), table


def resolve_auto_block_length(model, acceptance_profile: AcceptanceProfile | None = None,
                              cost_profile: CostProfile | None = None, candidates=CANDIDATES, batch: int = 1) -> int:
    """The block length for ``block_length="auto"``: maximises expected self-speculation tokens/s.

    Without arguments it uses the cached cost profile of this device (measured on first use, a few
    seconds) and the acceptance profile `tridlm bench` stored for these weights, or a prior when none
    was ever measured.
    """
    if cost_profile is None:
        cost_profile = cached_cost_profile(model, tokens=tuple(sorted({1, *candidates})), batch_sizes=(batch,),
                                           repeats=3, warmup=1)
    if acceptance_profile is None:
        acceptance_profile = load_acceptance_profile(model) or AcceptanceProfile.prior(max(candidates))
    return best_block_length(acceptance_profile, cost_profile, candidates, batch)[0]
