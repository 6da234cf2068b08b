"""Optimizers a callback owns for its own parameters (LSQ step sizes, distillation adapters)."""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_lightning as pl
import torch


def averaged_step(
    trainer: pl.Trainer, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]
) -> None:
    """One step of a callback-owned optimizer, run after each step of the model's optimizer.

    Under DDP the gradients are averaged across ranks first, as DDP does for the module's own
    parameters, so every rank takes the same step. Gradients are cleared afterwards.
    """
    if trainer.world_size > 1:
        for p in params:
            if p.grad is not None:
                p.grad.copy_(trainer.strategy.reduce(p.grad, reduce_op="mean"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
