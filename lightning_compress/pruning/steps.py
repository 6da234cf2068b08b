"""Steps on one clock: ``"10ep"`` (epochs), ``"500it"`` or an int (optimizer steps)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

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
