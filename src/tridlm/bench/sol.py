"""Speed-of-light (SOL) analysis of block denoising (spec §4.5).

Everything here takes a generic ``denoise(block_tokens [L]) -> logits [L, V]`` callable (block logits at
i predict token i), so the same code runs on a hand-built toy and on a real model (`block_denoiser`:
a read-only block forward over a prefix cache).

* Oracle target t: serial denoising from the starting block, one position per pass -- the masked
  position with the highest peak probability commits its argmax.
* Greedy parallel acceptance: each pass commits every masked position whose argmax equals t; when none
  does, it commits t at the most confident masked position. TPF = masked / passes (a lower bound).
* Recursive dynamic compaction (the SOL): each pass ranks the matched positions by confidence and
  binary-searches the largest top-k whose commit is *safe* -- serial decoding from the resulting state
  still reaches t. Checks spend at most `budget` forwards per block; an unaffordable check counts as
  unsafe. Top-1 is safe whenever the current state is (it is the next serial step), so the search starts
  at k = 1.

The mask id is never a candidate token: committing a mask would not be progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Denoiser = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_BUDGET = 5000  # forwards per block spent on safety checks (the paper's figure)


@dataclass
class Oracle:
    target: list[int]  # the whole block after serial decoding
    order: list[int]  # positions in commit order
    passes: int


@dataclass
class Trajectory:
    passes: int  # forwards that commit tokens
    commits: list[list[int]]  # positions committed by each pass
    check_forwards: int = 0  # forwards spent on safety checks (SOL only)
    budget_exhausted: bool = False


@dataclass
class BlockSOL:
    masked: int
    oracle_passes: int
    greedy_passes: int
    sol_passes: int
    check_forwards: int
    budget_exhausted: bool
    target: list[int] = field(repr=False)

    @property
    def greedy_tpf(self) -> float:
        return self.masked / self.greedy_passes

    @property
    def sol_tpf(self) -> float:
        return self.masked / self.sol_passes


def _predict(denoise: Denoiser, state: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, peak probability) per position, the mask id excluded from the candidates."""
    logits = denoise(state).float().cpu().clone()
    logits[:, mask_id] = float("-inf")
    conf, tok = torch.softmax(logits, dim=-1).max(dim=-1)
    return tok, conf


def _top_masked(conf: torch.Tensor, masked: torch.Tensor) -> int:
    # ties go to the leftmost position (argmax returns the first maximum)
    return int(torch.where(masked, conf, torch.tensor(-1.0)).argmax())


def oracle_target(denoise: Denoiser, block: torch.Tensor, mask_id: int) -> Oracle:
    state = block.clone()
    order = []
    while bool((state == mask_id).any()):
        tok, conf = _predict(denoise, state, mask_id)
        p = _top_masked(conf, state == mask_id)
        state[p] = tok[p]
        order.append(p)
    return Oracle(state.tolist(), order, len(order))


def greedy_parallel(denoise: Denoiser, block: torch.Tensor, target, mask_id: int) -> Trajectory:
    state, t = block.clone(), torch.as_tensor(target, dtype=block.dtype)
    commits = []
    while bool((state == mask_id).any()):
        masked = state == mask_id
        tok, conf = _predict(denoise, state, mask_id)
        hit = masked & (tok == t)
        if not bool(hit.any()):
            hit = torch.zeros_like(masked)
            hit[_top_masked(conf, masked)] = True
        state[hit] = t[hit]
        commits.append(hit.nonzero().flatten().tolist())
    return Trajectory(len(commits), commits)


class _SafetyChecker:
    """Does serial decoding from a state reach the target? Memoised; spends a forward budget."""

    def __init__(self, denoise: Denoiser, target: torch.Tensor, mask_id: int, budget: int):
        self.denoise, self.t, self.mask_id, self.budget = denoise, target, mask_id, budget
        self.used, self.exhausted = 0, False
        self.memo: dict[tuple, bool] = {}

    def __call__(self, state: torch.Tensor) -> bool:
        key = tuple(state.tolist())
        if key not in self.memo:
            self.memo[key] = self._serial_reaches_target(state.clone())
        return self.memo[key]

    def _serial_reaches_target(self, state: torch.Tensor) -> bool:
        while bool((state == self.mask_id).any()):
            if self.used >= self.budget:
                self.exhausted = True
                return False
            self.used += 1
            tok, conf = _predict(self.denoise, state, self.mask_id)
            p = _top_masked(conf, state == self.mask_id)
            if int(tok[p]) != int(self.t[p]):
                return False  # commits are absorbing: the block can no longer end at t
            state[p] = tok[p]
        return True


def _commit(state: torch.Tensor, positions: list[int], target: torch.Tensor) -> torch.Tensor:
    s = state.clone()
    s[positions] = target[positions]
    return s


def dynamic_compaction(denoise: Denoiser, block: torch.Tensor, target, mask_id: int,
                       budget: int = DEFAULT_BUDGET) -> Trajectory:
    state, t = block.clone(), torch.as_tensor(target, dtype=block.dtype)
    safe = _SafetyChecker(denoise, t, mask_id, budget)
    commits = []
    while bool((state == mask_id).any()):
        masked = state == mask_id
        tok, conf = _predict(denoise, state, mask_id)
        hit = masked & (tok == t)
        if not bool(hit.any()):  # only when the state is already off the serial path (never from the oracle)
            ranked = [_top_masked(conf, masked)]
        else:
            idx = hit.nonzero().flatten()
            # stable sort: equal confidences keep left-to-right order
            ranked = idx[torch.sort(conf[idx], descending=True, stable=True).indices].tolist()

        lo, hi = 1, len(ranked)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if safe(_commit(state, ranked[:mid], t)):
                lo = mid
            else:
                hi = mid - 1
        state = _commit(state, ranked[:lo], t)
        commits.append(sorted(ranked[:lo]))
    return Trajectory(len(commits), commits, safe.used, safe.exhausted)


def analyse_block(denoise: Denoiser, block: torch.Tensor, mask_id: int, budget: int = DEFAULT_BUDGET) -> BlockSOL:
    oracle = oracle_target(denoise, block, mask_id)
    greedy = greedy_parallel(denoise, block, oracle.target, mask_id)
    sol = dynamic_compaction(denoise, block, oracle.target, mask_id, budget)
    return BlockSOL(oracle.passes, oracle.passes, greedy.passes, sol.passes, sol.check_forwards,
                    sol.budget_exhausted, oracle.target)


# ---------------------------------------------------------------------------------------------
# on a real model
# ---------------------------------------------------------------------------------------------
def block_denoiser(model, cache) -> Denoiser:
    """Block logits for one block over the prefix in `cache` (row 0), which is read, never written."""

    @torch.no_grad()
    def denoise(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens[None].to(model.device), cache=cache, pattern="block", write_cache=False)[0]

    return denoise


@dataclass
class SOLSummary:
    block_length: int
    blocks: int
    tokens: int
    oracle_passes: int
    greedy_passes: int
    sol_passes: int
    check_forwards: int
    budget_exhausted_blocks: int

    @property
    def oracle_tpf(self) -> float:
        return self.tokens / self.oracle_passes

    @property
    def greedy_tpf(self) -> float:
        return self.tokens / self.greedy_passes

    @property
    def sol_tpf(self) -> float:
        return self.tokens / self.sol_passes

    # "real" TPF: each block also costs the causal pass that commits it to the cache (as in diffusion
    # mode), which is how the paper compares SOL with samplers (7.60 acceptance -> 6.02 real TPF at B=32)
    @property
    def greedy_real_tpf(self) -> float:
        return self.tokens / (self.greedy_passes + self.blocks)

    @property
    def sol_real_tpf(self) -> float:
        return self.tokens / (self.sol_passes + self.blocks)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(oracle_tpf=self.oracle_tpf, greedy_tpf=self.greedy_tpf, sol_tpf=self.sol_tpf,
                 greedy_real_tpf=self.greedy_real_tpf, sol_real_tpf=self.sol_real_tpf)
        return d


@torch.no_grad()
def sol_on_model(model, prompts: list[list[int]], block_length: int, blocks_per_prompt: int = 1,
                 budget: int = DEFAULT_BUDGET, seeded: bool = True) -> SOLSummary:
    """SOL per block over the model's own continuation; each block's oracle target is then written
    causally into the prefix cache (the commit pass) so the next block follows it.

    seeded: blocks start as the samplers' do, `[seed, MASK x (L-1)]` with the seed the causal pass's
    next-token argmax, and count all L tokens, so "real TPF" is exactly diffusion mode's accounting
    (L tokens per K denoise passes + 1 commit pass). False: all-mask blocks, as spec §4.5 states it.
    """
    if seeded and block_length < 2:
        raise ValueError("a seeded block needs block_length >= 2 (one seed and at least one mask)")
    mask_id = model.config.mask_token_id
    dev = model.device
    s = SOLSummary(block_length, 0, 0, 0, 0, 0, 0, 0)
    for ids in prompts:
        cache = model.new_cache(1, len(ids) + block_length * blocks_per_prompt)
        last = torch.tensor([[len(ids) - 1]], device=dev)
        logits = model(torch.tensor([ids], device=dev), cache=cache, logits_at=last)
        denoise = block_denoiser(model, cache)
        for _ in range(blocks_per_prompt):
            block = torch.full((block_length,), mask_id, dtype=torch.long)
            if seeded:
                next_logits = logits[0, -1].float().cpu()
                next_logits[mask_id] = float("-inf")
                block[0] = int(next_logits.argmax())
            r = analyse_block(denoise, block, mask_id, budget)
            s.blocks += 1
            s.tokens += block_length
            s.oracle_passes += r.oracle_passes
            s.greedy_passes += r.greedy_passes
            s.sol_passes += r.sol_passes
            s.check_forwards += r.check_forwards
            s.budget_exhausted_blocks += int(r.budget_exhausted)
            logits = model(torch.tensor([r.target], device=dev), cache=cache,
                           logits_at=torch.tensor([[block_length - 1]], device=dev))
    return s
