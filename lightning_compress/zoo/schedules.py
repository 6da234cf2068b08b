"""LR schedules the recipes need beyond torch's own."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def _cosine_then_constant(epoch: int, t_max: int, factor: float) -> float:
    if epoch >= t_max:
        return factor
    return 0.5 * (1.0 + math.cos(math.pi * epoch / t_max))


def cosine_then_constant(
    optimizer: torch.optim.Optimizer, T_max: int, factor: float = 0.1
) -> LambdaLR:
    """Cosine decay over ``T_max`` steps of the scheduler, then ``factor`` times the base LR.

    The fine-tuning baseline of Renda et al. 2020: train one round with the original schedule,
    then keep training (while pruning) at a small constant learning rate.

    Args:
        optimizer: The optimizer whose LR is scheduled.
        T_max: Length of the cosine phase, in scheduler steps (epochs by default).
        factor: LR after the cosine phase, relative to the base LR.

    Raises:
        ValueError: ``T_max`` < 1 or ``factor`` outside (0, 1].
    """
    if T_max < 1:
        raise ValueError(f"`T_max` must be >= 1, got {T_max}")
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"`factor` must be in (0, 1], got {factor}")
    return LambdaLR(optimizer, functools.partial(_cosine_then_constant, t_max=T_max, factor=factor))
