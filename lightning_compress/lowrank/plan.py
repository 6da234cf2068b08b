"""A rank plan: which weights, at which rank, at which step.

:func:`build_rank_plan` makes one from a :class:`~lightning_compress.lowrank.config.LowRankConfig`,
the targets' canonical shapes and the config's steps on the trainer's clock; it is then queried
as a pure function of the step (and, for ``energy``, of the spectrum): no Trainer involved, so
every rank and every resume computes the same ranks from the same inputs.

The rank falls from full to its target along the schedule the way sparsity rises in pruning: the
schedule's value is the share of the full rank removed (``1 - target / full`` at the end); with
``energy`` it is the share of the squared norm given up (``1 - energy`` at the end).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_compress.lowrank.config import LowRankConfig
from lightning_compress.lowrank.factors import full_rank, rank_for_energy
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.targets import match_overrides

_OWNER = "LowRankCallback"


@dataclass(frozen=True)
class LayerRank:
    """One target's place in the plan.

    Attributes:
        name: The weight's qualified name.
        shape: Its canonical ``(out, in, *kernel)`` shape.
        full: Its full rank.
        target: Its final rank, or None when ``energy`` decides it.
        schedule: The share of the rank (or energy) removed, as a function of the step.
    """

    name: str
    shape: tuple[int, ...]
    full: int
    target: int | None
    schedule: Schedule

    @property
    def out(self) -> int:
        return self.shape[0]

    @property
    def reduction(self) -> int:
        return math.prod(self.shape[1:])

    def params(self, rank: int) -> int:
        """Parameters of the layer at ``rank`` (:func:`factored_params`)."""
        return factored_params(self.shape, rank)


@dataclass
class RankPlan:
    """The ranks of every target along the schedule.

    Args:
        layers: Per target, in order.
        energy: The final kept energy, or None for fixed ranks.
    """

    layers: dict[str, LayerRank]
    energy: float | None = None

    def __post_init__(self) -> None:
        self._event_steps = frozenset(
            e for layer in self.layers.values() for e in layer.schedule.events()
        )

    def is_event(self, step: int) -> bool:
        return step in self._event_steps

    def first_event(self) -> int | None:
        firsts = [lay.schedule.events()[0] for lay in self.layers.values()]
        return min(firsts) if firsts else None

    def last_event(self) -> int | None:
        lasts = [lay.schedule.events()[-1] for lay in self.layers.values()]
        return max(lasts) if lasts else None

    def rank_at(self, name: str, step: int, singular: torch.Tensor | None = None) -> int:
        """The rank of ``name`` in force at ``step``.

        Args:
            name: A target.
            step: The optimizer step.
            singular: The weight's singular values (needed with ``energy``).
        """
        layer = self.layers[name]
        removed = layer.schedule.value_at(step)
        if layer.target is not None:
            return max(layer.target, round(layer.full * (1.0 - removed)))
        if singular is None:
            raise ValueError(f"{name}: `energy` needs the weight's singular values")
        if removed == 0.0:
            return layer.full
        return min(layer.full, rank_for_energy(singular, 1.0 - removed))


def factored_params(shape: tuple[int, ...], rank: int) -> int:
    """Parameters of a weight of canonical ``shape`` at ``rank``: r (m + n), or m n if smaller."""
    out, reduction = shape[0], math.prod(shape[1:])
    return min(rank * (out + reduction), out * reduction)


def rank_for_params(shape: tuple[int, ...], share: float) -> int:
    """The largest rank r with r (m + n) <= ``share`` * m n for a canonical ``shape`` (>= 1)."""
    out, reduction = shape[0], math.prod(shape[1:])
    # The epsilon keeps an exact budget (r (m + n) == share m n) from flooring one below.
    budget = share * out * reduction / (out + reduction)
    return max(1, min(full_rank(shape), math.floor(budget + 1e-9)))


def target_ranks(
    config: LowRankConfig, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, int | None]:
    """Each target's final rank (None where ``energy`` decides), checked against its layer.

    Raises:
        ValueError: An ``overrides`` pattern that matches no target, or an int rank above a
            layer's full rank.
    """
    overrides = match_overrides(list(shapes), dict(config.overrides or {}), "overrides", _OWNER)
    out: dict[str, int | None] = {}
    for name, shape in shapes.items():
        value = overrides.get(name, config.rank)
        full = full_rank(shape)
        if value is None and config.params is not None:
            out[name] = rank_for_params(shape, config.params)
        elif value is None:
            out[name] = None
        elif isinstance(value, float):
            out[name] = max(1, math.floor(value * full + 1e-9))
        else:
            if value > full:
                where = "`overrides`" if name in overrides else "`rank`"
                raise ValueError(
                    f"{_OWNER}: {where}={value} is above the full rank {full} of {name!r} "
                    f"(canonical shape {tuple(shape)}); give at most {full}, a float fraction, "
                    "or an override for it"
                )
            out[name] = int(value)
    return out


def build_rank_plan(
    config: LowRankConfig,
    shapes: Mapping[str, Sequence[int]],
    start: int,
    end: int,
    every: int,
) -> RankPlan:
    """The plan of ``config`` for targets of the given canonical shapes.

    Args:
        config: The callback's settings (validated).
        shapes: Per targeted name, the weight's canonical ``(out, in, *kernel)`` shape.
        start: ``config.start`` in optimizer steps.
        end: ``config.end`` in optimizer steps.
        every: ``config.every`` in optimizer steps.

    Raises:
        ValueError: ``end`` before ``start`` for a ramp, a bad override, a rank above a layer's
            full rank.
    """
    if end < start and config.schedule != "oneshot":
        raise ValueError(
            f"`end`={config.end} ({end} steps) is before `start`={config.start} ({start} steps)"
        )
    end = max(end, start)
    shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
    targets = target_ranks(config, shapes)
    layers = {}
    for name, shape in shapes.items():
        full, target = full_rank(shape), targets[name]
        removed = 1.0 - config.energy if target is None else 1.0 - target / full  # type: ignore[operator]
        # The schedule's value stays below 1 (a rank of at least 1, an energy above 0).
        schedule = Schedule(config.schedule, min(removed, 1.0 - 1e-12), start, end, every)
        layers[name] = LayerRank(name, shape, full, target, schedule)
    return RankPlan(layers, energy=config.energy)
