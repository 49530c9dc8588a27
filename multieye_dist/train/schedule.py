"""The release's learning-rate schedule, per optimizer step: linear warm-up, then cosine."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warm-up: lr * (step + 1) / warmup_steps, so the first step already moves the weights and
    step warmup_steps - 1 reaches lr. Then cosine from lr at step warmup_steps to min_lr at
    total_steps (held there after).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))
