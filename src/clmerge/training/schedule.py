"""Learning-rate schedule of the reference recipe (SPEC.md 3.4): linear warmup, then cosine to zero."""

from __future__ import annotations

import math
from typing import Optional


def warmup_length(total_steps: int, warmup_steps: int, warmup_ratio: Optional[float]) -> int:
    """Warmup steps of a task: ceil(ratio * total) when a ratio is set, else the fixed step count."""
    if warmup_ratio is not None:
        return math.ceil(warmup_ratio * total_steps)
    return warmup_steps


def lr_at(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """lr(s) = base*(s+1)/W for s < W, else base * 0.5 * (1 + cos(pi * (s - W) / (S - W))); s is 0-based."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def peak_lr(base_lr: float, warmup: int, total_steps: int) -> float:
    """The largest lr a task reaches (below base when the task ends inside warmup)."""
    if warmup <= 0 or total_steps > warmup:
        return base_lr
    return base_lr * total_steps / warmup
