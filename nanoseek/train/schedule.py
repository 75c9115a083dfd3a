"""Learning-rate and loss-weight schedules, as pure functions of the step (so resume needs no state)."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str = "cosine",
          min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Linear warmup, then cosine to min_ratio * base_lr, or warmup-stable-decay (linear decay over
    the last `decay_frac` of training), or constant."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    min_lr = base_lr * min_ratio
    if kind == "wsd":
        decay_start = int(total * (1 - decay_frac))
        if step < decay_start:
            return base_lr
        progress = (step - decay_start) / max(1, total - decay_start)
        return base_lr + (min_lr - base_lr) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def piecewise(step: int, total: int, first: float, then: float, switch_frac: float) -> float:
    """`first` until switch_frac * total steps, then `then` (V3's MTP lambda and bias gamma)."""
    return first if step < switch_frac * total else then
