"""Learning-rate schedules as plain functions of the step (no optimizer state).

The trainer calls :func:`lr_at` every step and writes the value into each param group, so a resumed run
gets exactly the same schedule from the step counter alone (nothing schedule-related in checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warmup, then half-cosine decay to 0 at ``total_steps``.

    Args:
        step: 0-based optimizer step about to be taken.
        total_steps: steps of the whole run (> 0).
        base_lr: peak learning rate (already scaled for the global batch, see :func:`scaled_lr`).
        warmup_steps: steps of linear warmup (0 = none).

    Returns:
        ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step is not 0, so it
        is not wasted), otherwise ``base_lr * 0.5 * (1 + cos(pi * p))`` with
        ``p = (step - warmup_steps) / (total_steps - warmup_steps)``; ``p`` is clamped to [0, 1], so steps
        past the end give 0.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay = total_steps - warmup_steps
    p = 1.0 if decay <= 0 else min(max((step - warmup_steps) / decay, 0.0), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * p))


def scaled_lr(lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: ``lr * global_batch / base_batch`` (MSCL: 0.02 per 128 clips)."""
    if global_batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be > 0, got global {global_batch}, base {base_batch}")
    return lr * global_batch / base_batch


def multistep_lr(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Step decay used by fine-tuning: ``base_lr * gamma ** (number of milestones <= epoch)``.

    The SSv2 recipe (docs/method.md, section 8) is ``milestones=(14, 18)``, ``gamma=0.1`` over 22 epochs.
    """
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
