"""Sparsity as a pure function of the optimizer step.

Nothing here counts: ``value_at(step)`` depends on ``step`` alone, so a resumed run, another
rank or a changed world size computes the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("oneshot", "linear", "cubic", "iterative", "constant")


@dataclass(frozen=True)
class Schedule:
    """When masks change and to which sparsity, in optimizer steps.

    Args:
        kind: One of :data:`SCHEDULES`.
        final: Final sparsity, in [0, 1).
        start: First event.
        end: Last event of ``linear``/``cubic`` (the final sparsity is reached there).
            Ignored by ``iterative``, which prunes every ``every`` until ``final``.
        every: Steps between events.
        initial: Sparsity at ``start`` for ``linear``/``cubic`` (s_i of Zhu & Gupta).
        rate: Fraction of the remaining weights pruned per ``iterative`` event.

    Raises:
        ValueError: Values out of range.
    """

    kind: str
    final: float
    start: int
    end: int
    every: int
    initial: float = 0.0
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {self.kind!r}")
        if not 0.0 <= self.final < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {self.final}")
        if not 0.0 <= self.initial <= self.final:
            raise ValueError(f"`initial` must be in [0, {self.final}], got {self.initial}")
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"need 0 <= start <= end, got start={self.start}, end={self.end}")
        if self.every < 1:
            raise ValueError(f"`every` must be at least one step, got {self.every}")
        if self.kind == "iterative" and (self.rate is None or not 0.0 < self.rate < 1.0):
            raise ValueError(f"`rate` must be in (0, 1) for 'iterative', got {self.rate}")

    @property
    def rounds(self) -> int:
        """Number of events (for ``iterative``: until the final sparsity is reached)."""
        if self.kind in ("oneshot", "constant"):
            return 1
        if self.kind == "iterative":
            assert self.rate is not None
            if self.final <= self.initial:
                return 0
            needed = math.log((1 - self.final) / (1 - self.initial)) / math.log(1 - self.rate)
            return max(1, math.ceil(needed - 1e-9))
        if self.end == self.start:
            return 1
        # start, start + every, ..., and `end` itself when it is not on that grid.
        return (self.end - self.start + self.every - 1) // self.every + 1

    def events(self) -> list[int]:
        """Every step at which masks are recomputed."""
        return [self._event(k) for k in range(self.rounds)]

    def _event(self, k: int) -> int:
        if self.kind in ("linear", "cubic"):
            return min(self.start + k * self.every, self.end)
        return self.start + k * self.every

    def round_index(self, step: int) -> int:
        """How many events happened at or before ``step``."""
        if step < self.start or self.rounds == 0:
            return 0
        if self.kind in ("linear", "cubic") and step >= self.end:
            return self.rounds
        return min(self.rounds, (step - self.start) // self.every + 1)

    def is_event(self, step: int) -> bool:
        k = self.round_index(step)
        return k > 0 and self._event(k - 1) == step

    def value_at(self, step: int) -> float:
        """Target sparsity in force at ``step`` (that of the last event at or before it)."""
        if self.kind == "constant":
            return self.initial
        k = self.round_index(step)
        if k == 0:
            return self.initial if self.kind in ("linear", "cubic") and step >= self.start else 0.0
        if k == self.rounds:
            return self.final
        if self.kind == "oneshot":
            return self.final
        if self.kind == "iterative":
            assert self.rate is not None
            return min(self.final, 1.0 - (1.0 - self.initial) * (1.0 - self.rate) ** k)
        progress = (self._event(k - 1) - self.start) / (self.end - self.start)
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * progress
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3
