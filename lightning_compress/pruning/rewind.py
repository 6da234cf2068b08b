"""Snapshots for rewinding: weights, optimizer and LR-scheduler state at one step.

Trainer-free: a snapshot is built from a module, its optimizers and their schedulers, holds
only tensors and primitives (so it rides in a ``weights_only`` checkpoint), and restores into
the same objects.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _clone(value: Any) -> Any:
    """A deep copy that detaches tensors onto the CPU, leaving primitives and containers."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


def take_snapshot(
    module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
) -> dict[str, Any]:
    """Copies the module's state_dict, each optimizer's and each scheduler's state.

    Args:
        module: The model (parameters and buffers are saved).
        optimizers: The trainer's optimizers.
        schedulers: Their LR schedulers (anything with ``state_dict``/``load_state_dict``).
    """
    return {
        "model": _clone(module.state_dict()),
        "optimizers": [_clone(o.state_dict()) for o in optimizers],
        "schedulers": [_clone(s.state_dict()) for s in schedulers],
    }


def check_snapshot(
    snapshot: dict[str, Any],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
) -> None:
    """Raises before anything is restored if the snapshot does not fit these objects.

    Raises:
        ValueError: Missing or extra model keys, a shape mismatch, or a different number of
            optimizers or schedulers.
    """
    state = module.state_dict()
    saved = snapshot["model"]
    missing, extra = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or extra:
        raise ValueError(
            f"the rewind snapshot does not match the model: missing {missing}, unexpected {extra}"
        )
    for name, value in saved.items():
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(
                f"the rewind snapshot holds {name!r} with shape {tuple(value.shape)}, the model "
                f"has {tuple(state[name].shape)}"
            )
    for kind, have, objs in (
        ("optimizers", snapshot["optimizers"], optimizers),
        ("schedulers", snapshot["schedulers"], schedulers),
    ):
        if len(have) != len(objs):
            raise ValueError(
                f"the rewind snapshot holds {len(have)} {kind}, the trainer has {len(objs)}"
            )


@torch.no_grad()
def restore_weights(module: nn.Module, snapshot: dict[str, Any]) -> None:
    """Copies the snapshot's parameters and buffers back into ``module`` in place."""
    state = module.state_dict(keep_vars=True)
    for name, value in snapshot["model"].items():
        state[name].copy_(value)


def restore_training_state(
    snapshot: dict[str, Any],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
) -> None:
    """Loads the snapshot's optimizer state (LR included) and LR-scheduler state."""
    for optimizer, state in zip(optimizers, snapshot["optimizers"], strict=True):
        optimizer.load_state_dict(copy.deepcopy(state))
    for scheduler, state in zip(schedulers, snapshot["schedulers"], strict=True):
        scheduler.load_state_dict(copy.deepcopy(state))


@torch.no_grad()
def reinitialize(module: nn.Module, snapshot: dict[str, Any], seed: int) -> list[str]:
    """Re-samples every parameter from its layer's own initialisation, seeded.

    Submodules with ``reset_parameters`` (Linear, Conv, norms, attention, ...) draw fresh values
    from a generator seeded by ``seed``, so every rank and a resumed run draw the same ones.
    Parameters no such submodule owns are copied from the snapshot instead.

    Returns:
        Names of the parameters that could not be re-sampled (restored from the snapshot).
    """
    reset: set[str] = set()
    devices = {p.device for p in module.parameters()}
    gpu = [d for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=gpu):
        torch.manual_seed(seed)
        for prefix, sub in module.named_modules():
            own = [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False)]
            if own and callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                reset.update(own)
    kept = []
    params = dict(module.named_parameters())
    for name, param in params.items():
        if name not in reset:
            param.copy_(snapshot["model"][name])
            kept.append(name)
    return kept
