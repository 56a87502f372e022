"""Generation parameters, validated once, before any forward pass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("ar", "diffusion", "spec", "spec-quadratic")
POLICIES = ("confidence_threshold", "low_confidence", "margin", "entropy", "leftmost")
DEFAULT_THRESHOLD = {"diffusion": 0.9, "spec": 0.0, "spec-quadratic": 0.0, "ar": 0.0}


class GenerationError(ValueError):
    """Invalid generation parameters or prompt (raised before the model runs)."""


@dataclass
class GenerationParams:
    """Everything one row needs to decode; `resolve` fills model-dependent defaults and checks ranges.

    threshold: diffusion -- commit every masked position whose score reaches it (the best one always
        commits); spec -- 0 drafts the block in one pass, > 0 drafts it in threshold passes.
    steps: at most this many denoise passes per block (default block_length); the count committed per
        pass never falls below what finishing the block within `steps` needs.
    """

    mode: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_id: int | None = None  # default: the model's
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end a row (e.g. a chat end-of-turn)
    ignore_eos: bool = False
    block_length: int = 32
    threshold: float | None = None  # default per mode (DEFAULT_THRESHOLD)
    steps: int | None = None  # default: block_length
    selection_policy: str = "confidence_threshold"

    def replace(self, **kw) -> GenerationParams:
        return dataclasses.replace(self, **kw)

    def resolve(self, config, prompt_lengths=()) -> GenerationParams:
        """Check every parameter against `config` (a ModelConfig) and the prompts; fill defaults."""
        p = dataclasses.replace(self)
        if p.mode not in MODES:
            raise GenerationError(f"unknown mode {p.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(p.block_length, int) or p.block_length < 1:
            raise GenerationError(f"block_length must be an integer >= 1, got {p.block_length!r}")
        if p.threshold is None:
            p.threshold = DEFAULT_THRESHOLD[p.mode]
        if not 0.0 <= float(p.threshold) <= 1.0:
            raise GenerationError(f"threshold must lie in [0, 1], got {p.threshold!r}")
        if p.steps is None:
            p.steps = p.block_length
        if not isinstance(p.steps, int) or p.steps < 1:
            raise GenerationError(f"steps (denoise passes per block) must be an integer >= 1, "
                                  f"got {p.steps!r}")
        if p.selection_policy not in POLICIES:
            raise GenerationError(f"unknown selection_policy {p.selection_policy!r}; choose one of "
                                  f"{', '.join(POLICIES)}")
        if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {p.max_new_tokens!r}")
        if p.temperature is None or p.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {p.temperature!r}")
        if p.top_k is None:
            p.top_k = 0
        if p.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {p.top_k!r}")
        if p.top_p is None:
            p.top_p = 1.0
        if not 0.0 < p.top_p <= 1.0:
            raise GenerationError(f"top_p must lie in (0, 1], got {p.top_p!r}")
        if isinstance(p.stop, str):
            p.stop = (p.stop,)
        p.stop = tuple(s for s in (p.stop or ()) if s)
        p.stop_token_ids = tuple(int(t) for t in (p.stop_token_ids or ()))
        for t in p.stop_token_ids + ((p.eos_token_id,) if p.eos_token_id is not None else ()):
            if not 0 <= t < config.vocab_size or t == config.mask_token_id:
                raise GenerationError(f"stop/EOS token id {t} is not a vocabulary token other than the mask")
        if p.eos_token_id is None and not p.ignore_eos:
            p.eos_token_id = config.eos_token_id
        if p.ignore_eos:
            p.eos_token_id = None
        window = config.max_position_embeddings
        for i, n in enumerate(prompt_lengths):
            if n < 1:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            if n > window:
                raise GenerationError(f"prompt {i} has {n} tokens, longer than the context window "
                                      f"({window} positions)")
        return p
