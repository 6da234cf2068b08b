"""LowRankConfig: every LowRankCallback argument, validated once, without a Trainer.

What needs the model (each layer's full rank, the targets) is checked by
:func:`~lightning_compress.lowrank.plan.build_rank_plan` in the callback's ``setup``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from lightning_compress.clock import Step, parse_step
from lightning_compress.config import MethodConfig

SCHEDULES = ("oneshot", "linear", "cubic")
METHODS = ("projected", "factored")


def check_rank(value: object, label: str) -> int | float:
    """Raises unless ``value`` is an int >= 1 or a float in (0, 1]; returns it.

    Args:
        value: A rank (int) or a fraction of each layer's full rank (float).
        label: How the message names it, e.g. ``"`rank`"``.

    Raises:
        ValueError: Anything else (bools included: ``rank=True`` is a mistake, not rank 1).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{label} must be an int >= 1 or a float in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{label} must be >= 1 (an int rank), got {value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(
            f"{label} must be in (0, 1] (a float is a fraction of the full rank), got {value}"
        )
    return value


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """The settings of one LowRankCallback (see it for what each one means).

    After validation ``start``/``end``/``every`` are :class:`~lightning_compress.clock.Step` and
    ``overrides`` is a dict; ``include``/``exclude`` stay as given (they are part of the state
    key).

    Raises:
        ValueError: An argument out of range, an unknown name, or two that contradict.
    """

    VERSION: ClassVar[int] = 1
    STATE_KEY: ClassVar[tuple[str, ...]] = (
        "rank",
        "energy",
        "params",
        "schedule",
        "include",
        "exclude",
    )

    rank: int | float | None = None
    # Instead of a rank: each layer keeps the smallest rank holding this share of its squared
    # Frobenius norm, decided from its spectrum at every event.
    energy: float | None = None
    # Or a parameter budget: each layer keeps the largest rank r with r (m + n) <= params * m n,
    # the same share of every layer's parameters whatever its shape ("a sixth of fc1").
    params: float | None = None
    schedule: str = "cubic"
    start: Step | str | int = "0ep"
    end: Step | str | int = "10ep"
    every: Step | str | int = "1ep"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    overrides: Mapping[str, int | float] | None = None
    # "projected" trains the real weight and retracts it to its rank after every step (any
    # layer, DDP, QAT on the product); "factored" trains the two factors and computes the layer
    # through them, which is cheaper than the dense layer itself (Linear, Conv1D, Conv2d).
    method: str = "projected"

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.rank, self.energy, self.params)]
        if sum(given) != 1:
            raise ValueError(
                "give exactly one of `rank` (an int, or a float fraction of each layer's full "
                "rank), `energy` (the share of each spectrum to keep) and `params` (the share of "
                f"each layer's parameters to keep), got rank={self.rank!r}, "
                f"energy={self.energy!r}, params={self.params!r}"
            )
        if self.params is not None and (
            isinstance(self.params, bool)
            or not isinstance(self.params, int | float)
            or not 0.0 < self.params <= 1.0
        ):
            raise ValueError(f"`params` must be in (0, 1], got {self.params!r}")
        if self.rank is not None:
            check_rank(self.rank, "`rank`")
        if self.energy is not None and (
            isinstance(self.energy, bool)
            or not isinstance(self.energy, int | float)
            or not 0.0 < self.energy <= 1.0
        ):
            raise ValueError(f"`energy` must be in (0, 1], got {self.energy!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}")
        overrides = dict(self.overrides or {})
        for pattern, value in overrides.items():
            check_rank(value, f"`overrides` rank for {pattern!r}")
        self._normalize("overrides", overrides)
        start, end, every = (parse_step(getattr(self, n), n) for n in ("start", "end", "every"))
        if every.value == 0:
            raise ValueError(f"`every` must be at least one step, got {self.every!r}")
        if start.unit == end.unit and end.value < start.value:
            raise ValueError(f"`end`={self.end!r} is before `start`={self.start!r}")
        for name, step in (("start", start), ("end", end), ("every", every)):
            self._normalize(name, step)
