"""Turning logits into tokens: temperature, top-k/top-p, seeded draws, commit policies, and the
speculative-sampling acceptance rule. Knows nothing of caches or modes.

Every function takes logits [..., V] of one row and that row's `torch.Generator`, so a row's draws
depend only on its own seed and logits (batched rows sample exactly as they would alone). The mask
token is banned everywhere: it can never be emitted.
"""

from __future__ import annotations

import functools
import math

import torch


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def ban(logits: torch.Tensor, banned_id: int | None) -> torch.Tensor:
    """Float32 copy of `logits` with `banned_id` (the mask token) at -inf."""
    out = logits.to(torch.float32, copy=True)  # one copy (.float().clone() made two)
    if banned_id is not None:
        out[..., banned_id] = -math.inf
    return out


_own_argmax: dict[torch.dtype, bool] = {}  # dtype -> tridlm's argmax_rows took less time here than torch's


def _argmax_is_own(logits: torch.Tensor) -> bool:
    """Whether greedy picks over `logits` take tridlm.native's argmax_rows: where the kernels are loaded and,
    timed once per process and dtype on a row like this one, it was the faster (it gives the same index)."""
    from .. import native

    if logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32) or not native.loaded():
        return False
    if logits.dtype not in _own_argmax:
        from ..kernels import median_seconds

        row = torch.randn(1, logits.shape[-1]).to(logits.dtype)
        _own_argmax[logits.dtype] = (median_seconds(lambda: torch.ops.tridlm.argmax_rows(row, 0), 7)
                                     < median_seconds(lambda: ban(row, 0).argmax(-1), 7))
    return _own_argmax[logits.dtype]


def greedy(logits: torch.Tensor, banned_id: int | None) -> torch.Tensor:
    """The argmax with `banned_id` left out (the first index of the largest value; a NaN counts as largest)."""
    if logits.shape[-1] and _argmax_is_own(logits):
        return torch.ops.tridlm.argmax_rows(logits, -1 if banned_id is None else banned_id)
    return ban(logits, banned_id).argmax(-1)


def distribution(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 banned_id: int | None = None) -> torch.Tensor:
    """The sampling distribution [..., V]; at temperature 0 the one-hot of the argmax."""
    x = ban(logits, banned_id)
    if temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float()
    x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, -math.inf)
    return x.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [..., V] (exponential race: argmax p/E with E ~ Exp(1))."""
    e = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / e).argmax(-1)


def uniform(n: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=like.device, dtype=torch.float32)


def sample(logits: torch.Tensor, params, generator: torch.Generator, banned_id: int | None) -> torch.Tensor:
    """Token ids [...] from logits [..., V] under `params` (temperature/top_k/top_p)."""
    if params.temperature == 0:
        return greedy(logits, banned_id)
    return draw(distribution(logits, params.temperature, params.top_k, params.top_p, banned_id), generator)


# -- diffusion: which masked positions to commit in one denoise pass ----------------------------------
PROBABILITY_POLICIES = ("confidence_threshold", "low_confidence", "leftmost")  # scored by p(token)


@functools.cache
def _torch_at_avx512() -> bool:
    """Whether torch's CPU kernels run at AVX-512 here (asked once: it does not change in a process)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def greedy_confidence(logits: torch.Tensor, banned_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy(logits), scores(logits, those, "confidence_threshold")) -- a greedy pass's picks and their
    probabilities -- in one native call where its bits are torch's: tridlm.native's kernel runs torch's own
    AVX-512 softmax steps, so it serves only where torch's CPU kernels run at AVX-512 too."""
    from .. import native

    if (logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32) and logits.shape[-1]
            and native.loaded() and _torch_at_avx512()):
        return torch.ops.tridlm.greedy_confidence(logits, -1 if banned_id is None else banned_id)
    tokens = greedy(logits, banned_id)
    return tokens, scores(logits, tokens, "confidence_threshold", banned_id)


def scores(logits: torch.Tensor, tokens: torch.Tensor, policy: str, banned_id: int | None) -> torch.Tensor:
    """Per-position score in [0, 1]-ish for `policy`, from the untempered distribution.

    confidence: p(token); margin: p(token) - best other p; entropy: 1 - H / log(V - 1).
    """
    probs = ban(logits, banned_id).softmax(-1)
    p_tok = probs.gather(-1, tokens[..., None])[..., 0]
    if policy == "margin":
        other = probs.scatter(-1, tokens[..., None], 0.0).max(-1).values
        return p_tok - other
    if policy == "entropy":
        h = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        return 1.0 - h / math.log(max(2, probs.shape[-1] - 1))
    return p_tok  # PROBABILITY_POLICIES (leftmost does not read it)


def commit_positions(score: torch.Tensor, masked: torch.Tensor, policy: str, threshold: float,
           n_min: int) -> torch.Tensor:
    """Bool [L]: the masked positions to commit this pass.

    Threshold policies commit every masked position scoring >= threshold, and always at least the
    n_min best; `low_confidence` commits exactly the n_min best; `leftmost` the n_min leftmost.
    Ties break towards the left (stable sort), so the choice is reproducible. A block holds a few
    positions: they are ranked as Python floats (the values of `score`, compared as its dtype
    compares them), a fraction of the time of a chain of small tensor ops.
    """
    values, open_ = score.float().tolist(), masked.tolist()
    if any(v != v for v in values):  # a NaN: ranked where torch's sort puts it
        return _commit_positions_torch(score, masked, policy, threshold, n_min)
    candidates = [i for i, m in enumerate(open_) if m]
    n_min = max(1, min(n_min, len(candidates)))
    order = candidates if policy == "leftmost" else sorted(candidates, key=lambda i: -values[i])  # stable
    chosen = [False] * len(open_)
    for i in order[:n_min]:
        chosen[i] = True
    if policy in ("confidence_threshold", "margin", "entropy"):
        floor = torch.tensor(threshold, dtype=score.dtype).item()  # `score >= threshold` compares in score's dtype
        chosen = [c or (m and v >= floor) for c, m, v in zip(chosen, open_, values, strict=True)]
    return torch.tensor(chosen, dtype=torch.bool, device=masked.device)


def _commit_positions_torch(score: torch.Tensor, masked: torch.Tensor, policy: str, threshold: float,
                            n_min: int) -> torch.Tensor:
    """commit_positions as tensor ops (scores with a NaN)."""
    n_masked = int(masked.sum())
    n_min = max(1, min(n_min, n_masked))
    if policy == "leftmost":
        order = torch.nonzero(masked)[:, 0]
    else:
        s = score.float().masked_fill(~masked, -math.inf)
        order = torch.sort(s, descending=True, stable=True).indices[:n_masked]
    chosen = torch.zeros_like(masked)
    chosen[order[:n_min]] = True
    if policy in ("confidence_threshold", "margin", "entropy"):
        chosen |= masked & (score >= threshold)
    return chosen


# -- self-speculation: verification ---------------------------------------------------------------------
def verify_greedy(verify_logits: torch.Tensor, drafts: torch.Tensor, banned_id: int | None):
    """Greedy verification. verify_logits [n, V] (causal: row i predicts token i+1 of the block),
    drafts [n-1] (block tokens 1..n-1). Returns the emitted tokens: the accepted drafts + the bonus."""
    ar = greedy(verify_logits, banned_id)
    n_match = int(torch.cumprod((ar[:-1] == drafts).long(), 0).sum()) if drafts.numel() else 0
    return ar[: n_match + 1]


def verify_sampled(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, generator: torch.Generator):
    """Speculative sampling (Leviathan et al. / Chen et al.): accept draft i with probability
    min(1, p_i(d)/q_i(d)); at the first rejection emit a sample of normalise(max(0, p_i - q_i)); when
    every draft passes, a bonus sample of p_n. The output is distributed exactly as sampling p.

    p [n, V]: target distributions (row i for block token i+1); q [n-1, V]: the draft distributions
    the drafts were drawn from, or None for deterministic drafts (q = one-hot of the draft).
    """
    n = drafts.numel()
    if q is None:
        q = torch.nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype) if n else p[:0]
    idx = torch.arange(n, device=p.device)
    p_d, q_d = p[idx, drafts], q[idx, drafts]
    u = uniform(n, p, generator)
    ok = u * q_d < p_d  # u < p/q, without dividing by a zero q
    n_acc = int(torch.cumprod(ok.long(), 0).sum()) if n else 0
    if n_acc < n:
        residual = (p[n_acc] - q[n_acc]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q: rejection has probability 0; guard rounding
            residual = p[n_acc]
        last = draw(residual / residual.sum(), generator)
    else:
        last = draw(p[n], generator)
    return torch.cat([drafts[:n_acc], last[None]])
