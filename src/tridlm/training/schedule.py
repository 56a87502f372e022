"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant.

A pure function of the step, so resuming needs only the step count.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, steps: int, lr: float, min_lr: float, warmup_steps: int, schedule: str,
          decay_fraction: float = 0.2) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * steps)) if decay_fraction > 0 else 0
        decay_start = steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return lr
        frac = min(1.0, (step - decay_start + 1) / decay_steps)
        return lr + (min_lr - lr) * frac
    raise ValueError(f"unknown schedule {schedule!r}")
