"""A pruning plan: which weights, on which schedule, scored how, in which structure.

:func:`build_plan` makes one from a :class:`~lightning_compress.pruning.config.PruneConfig`, the
targeted names and the config's steps converted on the trainer's clock; it is then queried as a
pure function of the optimizer step: ``plan.masks(step, weights, current)``. No Trainer
involved, so it is tested directly and every rank (and every resume) computes the same thing
from the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lightning_compress.layout import STANDARD, WeightLayout
from lightning_compress.pruning.criteria import CriterionContext, get_criterion
from lightning_compress.pruning.masks import (
    channel_masks,
    check_nm_inputs,
    floor_count,
    nm_masks,
    parse_nm,
    unstructured_masks,
)
from lightning_compress.pruning.schedules import Schedule
from lightning_compress.targets import match_overrides

if TYPE_CHECKING:
    from lightning_compress.pruning.config import PruneConfig

_OWNER = "PruneCallback"  # the user-facing name in targeting errors


def far_density(final: float) -> float:
    """The density under which a layer of a global group asked for ``final`` is far too sparse.

    1% of its weights while the group was asked to keep more; a quarter of what it was asked to
    keep from 99% sparsity on. One threshold over layers of different fan-in empties the wider
    ones (layer collapse), while a healthy run stays above: LeNet-300-100 pruned globally to 99%
    (the FlipOut recipe) keeps 0.49% of fc1, to 98% (the sweep) 1.2%.
    """
    return 0.01 if final < 0.99 else (1.0 - final) / 4


@dataclass(frozen=True)
class Overpruned:
    """A layer of a global group that a pruning event left far sparser than its group's target.

    Attributes:
        name: The weight's qualified name.
        sparsity: Its sparsity after the event.
        target: Its group's final target sparsity.
        floored: Held at the plan's ``min_density`` floor: the group's threshold would have
            pruned it further.
    """

    name: str
    sparsity: float
    target: float
    floored: bool


@dataclass(frozen=True)
class Shortfall:
    """A global group kept from its target because every layer of it is at its floor."""

    names: list[str]
    sparsity: float
    target: float


@dataclass
class PrunePlan:
    """Everything needed to turn weights and a step into masks.

    Args:
        schedules: Per targeted weight name, the schedule of its sparsity.
        global_groups: Names ranked together under one threshold (scope "global").
        structure: ``"unstructured"``, ``"channel"`` or ``"N:M"``.
        criterion: Name of a registered criterion.
        seed: Seed handed to the criterion (random scores stay identical across ranks).
        layouts: Per name, the weight's layout where it is not ``(out, in, *kernel)`` (a
            transformers ``Conv1D``): channels and N:M groups follow it.
        min_density: Fraction of its weights (channels, for ``"channel"``) every layer of a
            global group keeps at least; 0 lets the shared threshold take a whole layer.
    """

    schedules: dict[str, Schedule]
    global_groups: list[list[str]] = field(default_factory=list)
    structure: str = "unstructured"
    criterion: str = "magnitude"
    seed: int = 0
    layouts: dict[str, WeightLayout] = field(default_factory=dict)
    min_density: float = 0.0

    def __post_init__(self) -> None:
        self._nm = parse_nm(self.structure)
        self._criterion = get_criterion(self.criterion)
        # Every schedule has finitely many events, fixed at construction: look them up in O(1).
        self._event_steps = frozenset(e for s in self.schedules.values() for e in s.events())

    def is_event(self, step: int) -> bool:
        return step in self._event_steps

    def first_event(self) -> int | None:
        """The first step at which masks change, if any."""
        firsts = [s.events()[0] for s in self.schedules.values() if s.events()]
        return min(firsts) if firsts else None

    def last_event(self) -> int | None:
        """The last step at which masks change, if the schedule has an end."""
        ends = [s.events()[-1] for s in self.schedules.values() if s.events()]
        return max(ends) if ends else None

    def targets(self, step: int) -> dict[str, float]:
        return {name: s.value_at(step) for name, s in self.schedules.items()}

    def scores(
        self, step: int, weights: dict[str, torch.Tensor], state: dict[str, dict]
    ) -> dict[str, torch.Tensor]:
        return {
            name: self._criterion(
                w.detach(), CriterionContext(name, step, self.seed, state.get(name, {}))
            )
            for name, w in weights.items()
        }

    def masks(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        current: dict[str, torch.Tensor],
        state: dict[str, dict] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keep-masks at ``step``; never un-prunes what ``current`` already pruned."""
        targets = self.targets(step)
        if self.structure == "channel":
            masks = channel_masks(
                self._canonical(weights),
                self._canonical(current),
                targets,
                self.global_groups,
                self.min_density,
            )
            return self._canonical(masks, back=True)
        scores = self.scores(step, weights, state or {})
        if self._nm is None:
            return unstructured_masks(
                scores, current, targets, self.global_groups, self.min_density
            )
        masks = self._nm_masks(targets, self._canonical(scores), self._canonical(current))
        return self._canonical(masks, back=True)

    def overpruned(self, masks: dict[str, torch.Tensor]) -> list[Overpruned]:
        """The layers of global groups that ``masks`` leave far sparser than their group is asked.

        A layer is reported when it is held at the ``min_density`` floor, or when it keeps less
        than :func:`far_density` of its group's final target. Layers pruned alone, and N:M
        patterns (each group of M ranked alone), are at the sparsity they were given and never
        reported.
        """
        out: list[Overpruned] = []
        if self._nm is not None:
            return out
        for name in (n for group in self.global_groups for n in group):
            keep, target = masks[name], self.schedules[name].final
            kept = int(torch.count_nonzero(keep))
            floored = self.min_density > 0 and kept <= self._floor(name, keep)
            if floored or kept / keep.numel() < far_density(target):
                out.append(Overpruned(name, 1.0 - kept / keep.numel(), target, floored))
        return out

    def shortfalls(self, step: int, masks: dict[str, torch.Tensor]) -> list[Shortfall]:
        """The global groups that ``masks`` (made at ``step``) leave short of their target.

        Only floors do: a group falls short when every layer of it is at its floor.
        """
        floored = {o.name for o in self.overpruned(masks) if o.floored}
        targets = self.targets(step)
        out = []
        for group in self.global_groups:
            zeros = sum(masks[n].numel() - int(torch.count_nonzero(masks[n])) for n in group)
            size = sum(masks[n].numel() for n in group)
            if floored >= set(group) and zeros < round(targets[group[0]] * size):
                out.append(Shortfall(list(group), zeros / size, targets[group[0]]))
        return out

    def _floor(self, name: str, keep: torch.Tensor) -> int:
        """Weights the ``min_density`` floor keeps of the layer ``name`` (whole channels)."""
        if self.structure != "channel":
            return floor_count(keep.numel(), self.min_density)
        channels = self.layouts.get(name, STANDARD).canonical(keep).shape[0]
        return floor_count(channels, self.min_density) * (keep.numel() // channels)

    def _canonical(
        self, tensors: dict[str, torch.Tensor], back: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tensors in (out, in, *kernel) order (or back to the weights' own), per layout."""
        out = {}
        for name, t in tensors.items():
            layout = self.layouts.get(name, STANDARD)
            out[name] = layout.uncanonical(t).contiguous() if back else layout.canonical(t)
        return out

    def _nm_masks(
        self,
        targets: dict[str, float],
        scores: dict[str, torch.Tensor],
        current: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        assert self._nm is not None
        n, m = self._nm
        out = {}
        for name, score in scores.items():
            # Already-pruned weights rank lowest in their group, so the pattern only grows.
            score = score.float().masked_fill(~current[name], float("-inf"))
            zeros = min(m - n, round(targets[name] * m))
            (mask,) = nm_masks({name: score}, n, m, zeros).values()
            out[name] = mask & current[name]
        return out


def layer_values(
    config: PruneConfig, targets: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per targeted name, its ``overrides`` sparsity and its ``rates`` rate (if any).

    Raises:
        ValueError: A pattern that matches none of ``targets``, or a name matched by both.
    """
    valued = match_overrides(targets, config.overrides, "overrides", _OWNER)
    rated = match_overrides(targets, config.rates, "rates", _OWNER)
    both = sorted(set(rated) & set(valued))
    if both:
        raise ValueError(
            f"{_OWNER}: {both} match both `overrides` and `rates`; give each layer one"
        )
    return valued, rated


def check_targets(config: PruneConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raises for what the targeted weights make impossible, before any training step.

    Args:
        config: The callback's settings.
        shapes: Per targeted name, the weight's shape in (out, in, *kernel) order
            (:meth:`~lightning_compress.layout.WeightLayout.canonical_shape`).

    Raises:
        ValueError: Bad ``overrides``/``rates`` patterns, or an N:M structure whose M does not
            divide a weight's inputs.
    """
    layer_values(config, list(shapes))
    if config.nm is not None:
        for name, shape in shapes.items():
            check_nm_inputs(name, shape, *config.nm)


def build_plan(
    config: PruneConfig,
    targets: Sequence[str],
    start: int,
    end: int,
    every: int,
    layouts: Mapping[str, WeightLayout] | None = None,
) -> PrunePlan:
    """The plan of ``config`` for ``targets``, on the clock the steps were converted on.

    Each target follows the main schedule, except ``overrides`` (their own final sparsity) and
    ``rates`` (their own rate for the main schedule's number of rounds); those are pruned
    layer-wise, and with ``scope="global"`` the other targets share one threshold.

    Args:
        config: The callback's settings (validated).
        targets: Qualified names of the targeted weights.
        start: ``config.start`` in optimizer steps.
        end: ``config.end`` in optimizer steps.
        every: ``config.every`` in optimizer steps.
        layouts: Per name, the weight's layout where it is not the standard one.

    Raises:
        ValueError: ``end`` before ``start`` for a linear or cubic ramp (units that differ only
            compare in steps), or bad ``overrides``/``rates`` patterns.
    """
    if end < start and config.schedule in ("linear", "cubic"):
        raise ValueError(
            f"`end`={config.end} ({end} steps) is before `start`={config.start} ({start} steps)"
        )
    end = max(end, start)  # only linear and cubic read `end`
    valued, rated = layer_values(config, targets)
    main = Schedule(config.schedule, config.sparsity, start, end, every, rate=config.rate)
    rounds = len(main.events())
    cache: dict[tuple[float, float | None], Schedule] = {(main.final, main.rate): main}
    schedules: dict[str, Schedule] = {}
    for name in targets:
        final, rate = valued.get(name, main.final), main.rate
        if name in rated:
            # The same number of rounds as the rest, at this layer's own rate.
            rate = rated[name]
            final = 1.0 - (1.0 - rate) ** rounds
        if (final, rate) not in cache:
            cache[final, rate] = Schedule(config.schedule, final, start, end, every, rate=rate)
        schedules[name] = cache[final, rate]
    pooled = [n for n in targets if n not in valued and n not in rated]
    return PrunePlan(
        schedules,
        [pooled] if config.scope == "global" and pooled else [],
        structure=config.structure,
        criterion=config.criterion,
        seed=config.seed,
        layouts={n: lay for n, lay in (layouts or {}).items() if not lay.standard},
        min_density=config.min_density,
    )
