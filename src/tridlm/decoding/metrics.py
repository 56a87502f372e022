"""Every number a user sees about a generation, computed in one place.

Accounting (the same in every mode):
* the *prefill* is one causal forward over the prompt minus its last token; it only fills the KV
  cache, produces no token, and is counted apart (`prefill_forwards`, 0 for a one-token prompt);
* every later forward is a *decode forward* (`forwards`), and every generated token comes out of
  one: AR spends one per token, diffusion one causal commit pass per block (the first one commits
  the prompt's last token and predicts the first seed) plus its denoise passes, linear
  self-speculation a draft and a verify pass per cycle, quadratic self-speculation one per cycle;
* tokens per forward (TPF) = generated tokens / decode forwards, so AR's is exactly 1;
* an acceptance length is the number of tokens one verification emits (accepted drafts + the
  bonus token, 1..block_length), before any truncation at EOS, a stop string or the token limit;
* tokens/s counts generated tokens only, over the wall time from the row's start to its end.

For a batch, `CallMetrics.forwards` counts model calls (each serves every live row at once) while
its TPF is generated tokens over the per-row forwards summed, i.e. what one row sees on average.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _hist(xs) -> dict[int, int]:
    return dict(sorted(Counter(xs).items()))


@dataclass
class RowMetrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_forwards: int = 0
    forwards: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)
    denoise_passes: list[int] = field(default_factory=list)  # per block (diffusion) or per draft (spec)
    wall_time_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float | None:
        return self.generated_tokens / self.forwards if self.forwards else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else None

    @property
    def mean_acceptance_length(self) -> float | None:
        return _mean(self.acceptance_lengths)

    @property
    def mean_denoise_passes(self) -> float | None:
        return _mean(self.denoise_passes)

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_forwards": self.prefill_forwards,
            "forwards": self.forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_length_mean": self.mean_acceptance_length,
            "acceptance_length_histogram": _hist(self.acceptance_lengths),
            "denoise_passes_per_block_mean": self.mean_denoise_passes,
            "denoise_passes_histogram": _hist(self.denoise_passes),
            "wall_time_s": self.wall_time_s,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class CallMetrics:
    rows: list[RowMetrics] = field(default_factory=list)
    prefill_forwards: int = 0  # model calls that only prefilled
    forwards: int = 0  # model calls after (or beside) the prefill
    wall_time_s: float = 0.0

    @property
    def generated_tokens(self) -> int:
        return sum(r.generated_tokens for r in self.rows)

    @property
    def row_forwards(self) -> int:
        return sum(r.forwards for r in self.rows)

    @property
    def tokens_per_forward(self) -> float | None:
        return self.generated_tokens / self.row_forwards if self.row_forwards else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else None

    @property
    def acceptance_lengths(self) -> list[int]:
        return [a for r in self.rows for a in r.acceptance_lengths]

    @property
    def denoise_passes(self) -> list[int]:
        return [d for r in self.rows for d in r.denoise_passes]

    def to_dict(self) -> dict:
        return {
            "rows": len(self.rows),
            "generated_tokens": self.generated_tokens,
            "prefill_forwards": self.prefill_forwards,
            "forwards": self.forwards,
            "row_forwards": self.row_forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_length_mean": _mean(self.acceptance_lengths),
            "acceptance_length_histogram": _hist(self.acceptance_lengths),
            "denoise_passes_per_block_mean": _mean(self.denoise_passes),
            "denoise_passes_histogram": _hist(self.denoise_passes),
            "wall_time_s": self.wall_time_s,
            "tokens_per_second": self.tokens_per_second,
            "per_row": [r.to_dict() for r in self.rows],
        }
