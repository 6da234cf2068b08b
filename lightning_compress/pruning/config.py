"""PruneConfig: every PruneCallback argument, validated once, without a Trainer.

What can be checked from the arguments alone is checked here, when the config is built (and so
when the callback is); what needs the trainer's clock (steps per epoch) is checked by
:func:`~lightning_compress.pruning.plan.build_plan`, and what needs the model (targets) by the
callback's ``setup``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from lightning_compress.clock import Step, parse_step
from lightning_compress.config import MethodConfig
from lightning_compress.pruning.criteria import get_criterion
from lightning_compress.pruning.masks import parse_nm
from lightning_compress.pruning.schedules import check_fraction, check_kind, check_rate

SCOPES = ("global", "layer")

# FlipOut's own settings; any other value for another criterion is a mistake, not a no-op.
_FLIPOUT_DEFAULTS = (2.0, 1.0)


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """The settings of one PruneCallback (see it for what each one means).

    After validation ``sparsity`` is a float (implied by an N:M ``structure``, 0.9 when unset),
    ``start``/``end``/``every`` are :class:`~lightning_compress.clock.Step`, ``overrides`` and
    ``rates`` are dicts. ``include``/``exclude`` stay as given: they are part of the state key,
    which must not change for the same arguments.

    Raises:
        ValueError: An argument out of range, an unknown name, or two that contradict.
    """

    VERSION: ClassVar[int] = 1
    STATE_KEY: ClassVar[tuple[str, ...]] = (
        "sparsity",
        "schedule",
        "structure",
        "include",
        "exclude",
    )

    sparsity: float | None = None
    schedule: str = "cubic"
    start: Step | str | int = "0ep"
    end: Step | str | int = "10ep"
    every: Step | str | int = "1ep"
    criterion: str = "magnitude"
    scope: str = "global"
    structure: str = "unstructured"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    # Only for schedule="iterative": there the number of rounds follows from it, not from `end`.
    rate: float | None = None
    overrides: Mapping[str, float] | None = None
    # Per-layer rates keep the main schedule's number of rounds (Frankle & Carbin's output layer).
    rates: Mapping[str, float] | None = None
    seed: int = 0
    flipout_p: float = _FLIPOUT_DEFAULTS[0]
    flipout_noise: float = _FLIPOUT_DEFAULTS[1]
    # The metric a round of an iterative schedule records (the accuracy of the rounds table).
    monitor: str | None = "val/acc"
    # One threshold over layers of different fan-in can empty the wider one (layer collapse:
    # nn.Linear's init bounds weights by 1/sqrt(fan_in)). 0.1% keeps a 4096x11008 projection
    # connected (11 weights per output) and sits 5x under the sparsest layer of the recipes, whose
    # results it leaves as they were: LeNet-300-100 pruned globally to 99% keeps 0.49% of fc1.
    min_density: float = 0.001

    def __post_init__(self) -> None:
        self._normalize("sparsity", self._check_sparsity())
        check_kind(self.schedule, "schedule")
        if self.scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {self.scope!r}")
        get_criterion(self.criterion)  # raises, naming the registered criteria
        check_rate(self.schedule, self.rate, "schedule")
        check_fraction(self.min_density, "`min_density`")
        self._check_layer_values()
        self._check_flipout()
        self._check_steps()

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M ``structure``, None for the others."""
        return parse_nm(self.structure)

    def _check_sparsity(self) -> float:
        nm = self.nm  # raises for an unknown structure
        sparsity = self.sparsity
        if nm is not None:
            implied = (nm[1] - nm[0]) / nm[1]
            if sparsity is not None and not math.isclose(sparsity, implied):
                raise ValueError(
                    f"`sparsity`={sparsity} contradicts `structure`={self.structure!r}, which "
                    f"means sparsity {implied:g}; leave `sparsity` unset for N:M"
                )
            sparsity = implied
        sparsity = 0.9 if sparsity is None else sparsity
        check_fraction(sparsity, "`sparsity`")
        return sparsity

    def _check_layer_values(self) -> None:
        overrides, rates = dict(self.overrides or {}), dict(self.rates or {})
        for pattern, value in overrides.items():
            check_fraction(value, "`overrides` sparsity", got=f"{pattern!r}: {value}")
        if overrides and self.nm is not None:
            raise ValueError("`overrides` cannot change the sparsity of an N:M structure")
        if rates and self.schedule != "iterative":
            raise ValueError(f"`rates` applies only to schedule='iterative', got {self.schedule!r}")
        for pattern, value in rates.items():
            check_fraction(value, "`rates`", low_open=True, got=f"{pattern!r}: {value}")
        self._normalize("overrides", overrides)
        self._normalize("rates", rates)

    def _check_steps(self) -> None:
        start, end, every = (parse_step(getattr(self, n), n) for n in ("start", "end", "every"))
        if every.value == 0:
            raise ValueError(f"`every` must be at least one step, got {self.every!r}")
        # Steps in different units compare only on the trainer's clock (build_plan checks them).
        if start.unit == end.unit and end.value < start.value:
            raise ValueError(f"`end`={self.end!r} is before `start`={self.start!r}")
        if self.criterion == "flipout" and start.value == 0:
            raise ValueError(
                f"`criterion`='flipout' needs optimizer steps to count sign flips before the "
                f"first pruning event, got `start`={start}; start at '1ep' or later"
            )
        for name, step in (("start", start), ("end", end), ("every", every)):
            self._normalize(name, step)

    def _check_flipout(self) -> None:
        if self.criterion != "flipout":
            if (self.flipout_p, self.flipout_noise) != _FLIPOUT_DEFAULTS:
                raise ValueError(
                    f"`flipout_p`/`flipout_noise` apply only to criterion='flipout', got "
                    f"criterion={self.criterion!r}"
                )
            return
        if self.schedule == "constant":
            raise ValueError(
                "`criterion`='flipout' cannot follow schedule='constant', which never "
                "scores weights; use 'iterative' (the paper's), 'oneshot', 'linear' or 'cubic'"
            )
        if self.structure == "channel":
            raise ValueError(
                "`criterion`='flipout' scores single weights; it cannot drive "
                "structure='channel' (use 'unstructured' or 'N:M')"
            )
        if self.flipout_p <= 0:
            raise ValueError(f"`flipout_p` must be > 0, got {self.flipout_p}")
        if self.flipout_noise < 0:
            raise ValueError(f"`flipout_noise` must be >= 0, got {self.flipout_noise}")
