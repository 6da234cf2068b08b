"""Sparsity as a pure function of the optimizer step.

Nothing here counts: ``value_at(step)`` depends on ``step`` alone, so a resumed run, another
rank or a changed world size computes the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("oneshot", "linear", "cubic", "iterative", "constant")


# The rules on a schedule's values, shared by Schedule and PruneConfig: one copy of each, with
# the argument named as the caller's user knows it (`kind` here, `schedule` on the callback).


def check_fraction(
    value: float | None,
    label: str,
    *,
    low_open: bool = False,
    context: str = "",
    got: str | None = None,
) -> None:
    """Raises unless ``value`` is in [0, 1) (in (0, 1) with ``low_open``).

    Args:
        value: A sparsity or a rate.
        label: How the message names it, e.g. ``"`sparsity`"``.
        low_open: Exclude 0 (a rate of 0 never prunes).
        context: Said after the interval, e.g. ``" for schedule='iterative'"``.
        got: How the message shows the value (default: the value itself).

    Raises:
        ValueError: ``value`` is None or out of range.
    """
    inside = value is not None and (value > 0.0 if low_open else value >= 0.0) and value < 1.0
    if not inside:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(
            f"{label} must be in {interval}{context}, got {value if got is None else got}"
        )


def check_kind(kind: str, arg: str = "kind") -> None:
    """Raises unless ``kind`` is one of :data:`SCHEDULES`; ``arg`` names it in the message."""
    if kind not in SCHEDULES:
        raise ValueError(f"`{arg}` must be one of {SCHEDULES}, got {kind!r}")


def check_rate(kind: str, rate: float | None, arg: str = "kind") -> None:
    """Raises unless ``rate`` is in (0, 1) for ``iterative`` and None for the other kinds.

    Args:
        kind: One of :data:`SCHEDULES`.
        rate: Fraction of the remaining weights pruned per event.
        arg: How the message names ``kind``.
    """
    if kind == "iterative":
        check_fraction(rate, "`rate`", low_open=True, context=f" for {arg}='iterative'")
    elif rate is not None:
        raise ValueError(
            f"`rate` applies only to {arg}='iterative', got rate={rate} for {arg}={kind!r}"
        )


@dataclass(frozen=True)
class Schedule:
    """When masks are recomputed and to which sparsity, in optimizer steps.

    Before its first event a schedule is at ``initial`` (0.0 by default: nothing pruned yet).

    - ``oneshot``: ``final`` at ``start``.
    - ``linear``, ``cubic``: events at ``start``, ``start + every``, ... and at ``end`` itself,
      ``initial`` at ``start`` rising to ``final`` exactly at ``end`` (cubic: Zhu & Gupta 2017);
      ``end == start`` is a one-shot.
    - ``iterative``: events every ``every`` from ``start``, each pruning ``rate`` of the weights
      that remain, until ``final`` (the last event lands exactly on it). The number of rounds
      follows from ``rate`` and ``final``, so ``end`` is not used: it never cuts the run short.
    - ``constant``: one event at ``start`` holding ``initial`` (existing masks are kept).

    Args:
        kind: One of :data:`SCHEDULES`.
        final: Final sparsity, in [0, 1).
        start: First event.
        end: Last event of ``linear``/``cubic``, >= ``start``.
        every: Steps between events, >= 1.
        initial: Sparsity before the first event, s_i of Zhu & Gupta, in [0, ``final``].
        rate: Fraction of the remaining weights pruned per event, in (0, 1); ``iterative`` only.

    Raises:
        ValueError: A value out of range, or ``rate`` missing for (or given to a kind other
            than) ``iterative``.
    """

    kind: str
    final: float
    start: int
    end: int
    every: int
    initial: float = 0.0
    rate: float | None = None

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_fraction(self.final, "`final`")
        if not 0.0 <= self.initial <= self.final:
            raise ValueError(f"`initial` must be in [0, `final`={self.final}], got {self.initial}")
        if self.start < 0:
            raise ValueError(f"`start` must be >= 0, got {self.start}")
        if self.end < self.start:
            raise ValueError(f"`end` must be >= `start`={self.start}, got {self.end}")
        if self.every < 1:
            raise ValueError(f"`every` must be >= 1 optimizer step, got {self.every}")
        check_rate(self.kind, self.rate)

    def _rounds(self) -> int:
        """Number of events."""
        if self.kind == "iterative":
            assert self.rate is not None
            if self.final == self.initial:
                return 0
            needed = math.log((1 - self.final) / (1 - self.initial)) / math.log(1 - self.rate)
            # A final of exactly 1 - (1 - rate)^k (FlipOut's 1 - 0.5^k) can come out of the logs
            # as k + 1e-16; that must not add a round that prunes next to nothing.
            return max(1, math.ceil(needed - 1e-9))
        if self.kind in ("linear", "cubic"):
            # start, start + every, ... below end, then end itself.
            return (self.end - self.start + self.every - 1) // self.every + 1
        return 1

    def _event(self, k: int) -> int:
        """The step of event ``k`` (0-based)."""
        if self.kind in ("linear", "cubic"):
            return min(self.start + k * self.every, self.end)
        return self.start + k * self.every

    def events(self) -> list[int]:
        """Every step at which masks are recomputed, in order."""
        return [self._event(k) for k in range(self._rounds())]

    def round_index(self, step: int) -> int:
        """How many events happened at or before ``step`` (0 before the first).

        Args:
            step: Optimizer step.
        """
        if step < self.start:
            return 0
        if self.kind in ("linear", "cubic") and step >= self.end:
            return self._rounds()
        return min(self._rounds(), (step - self.start) // self.every + 1)

    def is_event(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``.

        Args:
            step: Optimizer step.
        """
        k = self.round_index(step)
        return k > 0 and self._event(k - 1) == step

    def value_at(self, step: int) -> float:
        """Target sparsity in force at ``step``: that of the last event at or before it.

        Args:
            step: Optimizer step.
        """
        k = self.round_index(step)
        if self.kind == "constant" or k == 0:
            return self.initial
        if k == self._rounds():
            return self.final
        if self.kind == "iterative":
            assert self.rate is not None
            return 1.0 - (1.0 - self.initial) * (1.0 - self.rate) ** k
        # 0 < k < rounds: a linear or cubic ramp, so end > start.
        progress = (self._event(k - 1) - self.start) / (self.end - self.start)
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * progress
        # Zhu & Gupta's s_f + (s_i - s_f)(1 - p)^3, arranged to give s_i exactly at p = 0.
        return self.initial + (self.final - self.initial) * (1.0 - (1.0 - progress) ** 3)
