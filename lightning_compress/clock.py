"""The training clock every callback runs on.

A point on it is written ``"10ep"`` (epochs), ``"500it"`` or an int (optimizer steps); every
schedule is a pure function of ``trainer.global_step`` (optimizer steps). Epochs convert through
the number of optimizer steps the fit loop really takes per epoch, so gradient accumulation,
``limit_train_batches`` and the world size never make a schedule drift, and resume stays exact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pytorch_lightning as pl

_STEP = re.compile(r"^\s*([0-9]+)\s*(ep|it)?\s*$")


@dataclass(frozen=True)
class Step:
    """A point on the training clock, in epochs or optimizer steps.

    Args:
        value: How many epochs or optimizer steps.
        unit: ``"ep"`` (epochs) or ``"it"`` (optimizer steps).
    """

    value: int
    unit: Literal["ep", "it"]

    def to_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps, given how many the trainer really takes per epoch.

        Args:
            steps_per_epoch: Optimizer steps per epoch (after gradient accumulation, batch limits
                and world size); ignored for ``"it"``.
        """
        return self.value * steps_per_epoch if self.unit == "ep" else self.value

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


def parse_step(value: str | int | Step, name: str) -> Step:
    """Parses a step argument.

    Args:
        value: ``"10ep"``, ``"500it"``, ``"500"`` or an int >= 0 (optimizer steps); a
            :class:`Step` is returned as is.
        name: The argument's name, for the error message.

    Raises:
        ValueError: A negative or malformed value.
    """
    if isinstance(value, Step):
        return value
    # bool is an int subclass, but `start=True` is a mistake, not step 1.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Step(value, "it")
    match = _STEP.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"`{name}` must be a non-negative int or a string like '10ep' or '500it', got {value!r}"
        )
    return Step(int(match.group(1)), match.group(2) or "it")  # type: ignore[arg-type]


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch, as the fit loop will really take them.

    Lightning steps the optimizer every ``accumulate_grad_batches`` batches and on the last batch
    of an epoch; ``num_training_batches`` already reflects ``limit_train_batches`` and, under a
    distributed sampler, the world size. Returns 0 when the dataloader has no length.
    """
    batches = trainer.num_training_batches
    if batches == float("inf"):
        return 0
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))


def to_steps(step: Step, spe: int, arg: str) -> int:
    """Optimizer steps of ``step``, given ``spe`` optimizer steps per epoch.

    Args:
        step: The point on the clock.
        spe: Optimizer steps per epoch (:func:`steps_per_epoch`), 0 when unknown.
        arg: The argument's name, for the error message.

    Raises:
        ValueError: ``step`` is in epochs and the epoch length is unknown.
    """
    if step.unit == "ep" and spe == 0:
        raise ValueError(
            f"`{arg}`={step} is in epochs, but the training dataloader has no length; give "
            "steps in optimizer iterations instead (e.g. '500it')"
        )
    return step.to_steps(spe)


def resolve_steps(trainer: pl.Trainer, **steps: Step | None) -> dict[str, int | None]:
    """Every named step converted on ``trainer``'s clock (``None`` stays ``None``).

    One call per callback per fit: ``resolve_steps(trainer, start=self.start, end=self.end)``.
    """
    spe = steps_per_epoch(trainer)
    return {arg: None if s is None else to_steps(s, spe, arg) for arg, s in steps.items()}
