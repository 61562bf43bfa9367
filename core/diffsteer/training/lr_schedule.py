"""Learning-rate schedule: linear warm-up, then constant or cosine decay to zero.

A pure function of the step, so the schedule's whole state is the step number and resuming needs
nothing else.
"""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_steps`` (``(step + 1) / warmup_steps``, so the first step
    already moves the weights); ``cosine`` then falls as a half cosine to 0 at ``steps``.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, config.steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
