"""Learning-rate schedules stepped once per optimiser step.

Each builder takes the optimiser and the total number of steps (Lightning's
``estimated_stepping_batches``) and returns a ``LambdaLR``, so Hydra configs only name the
shape of the schedule, never a step count that would go stale when the data size changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_factor(step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    # Start at 1/1000 of the learning rate, as the detection recipes do.
    alpha = step / warmup_steps
    return 0.001 * (1 - alpha) + alpha


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.01
) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` of the lr."""
    warmup_steps = min(warmup_steps, max(total_steps // 4, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup_factor(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_multistep(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    milestones: Sequence[float] = (0.67, 0.89),
    gamma: float = 0.1,
) -> LambdaLR:
    """Linear warm-up, then multiply by ``gamma`` at each milestone (a fraction of the steps)."""
    if any(not 0 < m < 1 for m in milestones):
        raise ValueError(f"scheduler milestones are fractions of training in (0, 1): {milestones}")
    warmup_steps = min(warmup_steps, max(total_steps // 4, 0))
    boundaries = sorted(int(m * total_steps) for m in milestones)

    def factor(step: int) -> float:
        decays = sum(step >= b for b in boundaries)
        return _warmup_factor(step, warmup_steps) * gamma**decays

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """No schedule: the optimiser's learning rate throughout."""
    return LambdaLR(optimizer, lambda step: 1.0)
