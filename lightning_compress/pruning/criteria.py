"""Pruning criteria: a registry of scoring functions looked up by name.

A criterion maps a weight to scores of the same shape; higher scores are kept. Turning scores
into masks (thresholds, structure, exact counts) is the caller's job, so a new criterion is a
few lines::

    @register_criterion("taylor")
    def taylor(weight, ctx):
        return (weight * ctx.state["grad"]).abs()
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class CriterionContext:
    """What a criterion may use besides the weight.

    Args:
        name: Qualified parameter name.
        step: Optimizer step of the pruning event.
        seed: The callback's seed.
        state: Per-parameter extra data a callback keeps (e.g. flip counts).
    """

    name: str
    step: int
    seed: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)


Criterion = Callable[[torch.Tensor, CriterionContext], torch.Tensor]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, override: bool = False) -> Callable[[Criterion], Criterion]:
    """Decorator registering a criterion under ``name``.

    Args:
        name: The name configs and ``PruneCallback(criterion=...)`` use.
        override: Replace a criterion already registered under ``name``.

    Raises:
        ValueError: ``name`` is taken and ``override`` is False.
    """

    def decorator(fn: Criterion) -> Criterion:
        if name in CRITERIA and not override:
            raise ValueError(
                f"`name` {name!r} is already a registered criterion; pass override=True to "
                "replace it"
            )
        CRITERIA[name] = fn
        return fn

    return decorator


def get_criterion(name: str) -> Criterion:
    """Looks up a registered criterion.

    Args:
        name: A key of :data:`CRITERIA`.

    Raises:
        ValueError: Unknown name, listing the registered ones.
    """
    if name not in CRITERIA:
        raise ValueError(f"`criterion` must be one of {sorted(CRITERIA)}, got {name!r}")
    return CRITERIA[name]


@register_criterion("magnitude")
def magnitude(weight: torch.Tensor, ctx: CriterionContext) -> torch.Tensor:
    """|w| (Han et al. 2015; Zhu & Gupta 2017)."""
    return weight.abs()


@register_criterion("random")
def random(weight: torch.Tensor, ctx: CriterionContext) -> torch.Tensor:
    """Uniform scores, identical for the same (seed, step, name) on every rank and resume."""
    # crc32, unlike hash(), is the same in every process; a CPU generator gives the same numbers
    # whatever the weight's device.
    seed = (ctx.seed * 1_000_003 + ctx.step * 7919 + zlib.crc32(ctx.name.encode())) % (2**63)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape, generator=generator).to(weight.device)
