"""A pruning plan: which weights, on which schedule, scored how, in which structure.

Built once the trainer's clock is known (steps per epoch), then queried as a pure function of
the optimizer step: ``plan.masks(step, weights, current)``. No Trainer involved, so it is tested
directly and every rank (and every resume) computes the same thing from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_compress.pruning.criteria import CriterionContext, get_criterion
from lightning_compress.pruning.masks import channel_masks, nm_masks, parse_nm, unstructured_masks
from lightning_compress.pruning.schedules import Schedule


@dataclass
class PrunePlan:
    """Everything needed to turn weights and a step into masks.

    Args:
        schedules: Per targeted weight name, the schedule of its sparsity.
        global_groups: Names ranked together under one threshold (scope "global").
        structure: ``"unstructured"``, ``"channel"`` or ``"N:M"``.
        criterion: Name of a registered criterion.
        seed: Seed handed to the criterion (random scores stay identical across ranks).
    """

    schedules: dict[str, Schedule]
    global_groups: list[list[str]] = field(default_factory=list)
    structure: str = "unstructured"
    criterion: str = "magnitude"
    seed: int = 0

    def __post_init__(self) -> None:
        self._nm = parse_nm(self.structure)
        self._criterion = get_criterion(self.criterion)
        # Every schedule has finitely many events, fixed at construction: look them up in O(1).
        self._event_steps = frozenset(e for s in self.schedules.values() for e in s.events())

    @property
    def names(self) -> list[str]:
        return list(self.schedules)

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
            return channel_masks(weights, current, targets, self.global_groups)
        scores = self.scores(step, weights, state or {})
        if self._nm is None:
            return unstructured_masks(scores, current, targets, self.global_groups)
        n, m = self._nm
        out = {}
        for name, score in scores.items():
            # Already-pruned weights rank lowest in their group, so the pattern only grows.
            score = score.float().masked_fill(~current[name], float("-inf"))
            zeros = min(m - n, round(targets[name] * m))
            (mask,) = nm_masks({name: score}, n, m, zeros).values()
            out[name] = mask & current[name]
        return out
