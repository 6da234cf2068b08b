"""The settings of quantization-aware training, validated once, with no Trainer in sight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from lightning_compress.clock import Step, parse_step
from lightning_compress.config import MethodConfig

METHODS = ("ste", "lsq")


@dataclass(frozen=True)
class QATConfig(MethodConfig):
    """What :class:`~lightning_compress.QATCallback` is told; its keyword arguments, one to one.

    Args:
        bits: Weight bits, 2 to 8.
        start: Step from which quantization is on (``"Nep"``, ``"Nit"`` or an int); a
            :class:`~lightning_compress.clock.Step` after validation.
        activations: Activation bits (8) or None/0 for float activations (None after validation).
        method: ``"ste"`` (scales from the weights' range) or ``"lsq"`` (learned step sizes).
        freeze_observers: Step after which activation ranges stop updating (None: never).
        freeze_bn: Step after which BatchNorm running statistics stop updating (None: never).
        fold_bn: Fold each Conv's following BatchNorm into the quantized weight. None: fold the
            pairs that exist; True: there must be at least one pair; False: never fold.
        include: Module or parameter name patterns (default: every Linear/Conv/attention weight).
        exclude: Patterns removed from the targets.
        overrides: Weight bits per name pattern, e.g. ``{"fc3": 8}`` (a dict after validation).
        lsq_lr: Learning rate of the step sizes (``method="lsq"``).
        quantize_output: Also fake-quantize the output of the model's last quantized layer
            (the logits, as a rule). Off by default: its weights are still quantized, but
            clipping the logits to a range observed early in training caps how confident the
            model can become, and the packed model keeps that output in float too.

    Raises:
        ValueError: An argument out of range, an unknown method, or a freeze step before
            ``start`` in the same unit.
    """

    VERSION: ClassVar[int] = 1
    # `include`/`exclude` stay as given: the key's text must not change for old checkpoints.
    STATE_KEY: ClassVar[tuple[str, ...]] = ("bits", "include", "exclude")

    bits: int = 8
    start: str | int | Step = "0ep"
    activations: int | None = 8
    method: str = "ste"
    freeze_observers: str | int | Step | None = None
    freeze_bn: str | int | Step | None = None
    fold_bn: bool | None = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    # Mixed precision, e.g. the first and last layers at 8 bits when the rest is at 4.
    overrides: dict[str, int] | None = None
    # Only used by method="lsq": the step sizes have their own Adam, the model's is untouched.
    lsq_lr: float = 1e-3
    # Logits clipped to an early range cap the model's confidence (int8 QAT of a BERT
    # classifier lost 24 points to it); most toolchains leave the model's output in float.
    quantize_output: bool = False

    def __post_init__(self) -> None:
        for where, value in [
            ("bits", self.bits),
            *((f"overrides[{k!r}]", v) for k, v in (self.overrides or {}).items()),
        ]:
            if not isinstance(value, int) or not 2 <= value <= 8:
                raise ValueError(f"`{where}` must be an integer in [2, 8], got {value!r}")
        if self.activations not in (None, 0, 8):
            raise ValueError(f"`activations` must be 8 or None (float), got {self.activations!r}")
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}")
        start = parse_step(self.start, "start")
        self._normalize("start", start)
        self._normalize("activations", self.activations or None)
        freezes = {
            arg: None if getattr(self, arg) is None else parse_step(getattr(self, arg), arg)
            for arg in ("freeze_observers", "freeze_bn")
        }
        for arg, step in freezes.items():
            if step is not None and step.unit == start.unit and step.value < start.value:
                raise ValueError(f"`{arg}`={step} is before `start`={start}")
            self._normalize(arg, step)
        self._normalize("overrides", dict(self.overrides or {}))
        if self.lsq_lr <= 0:
            raise ValueError(f"`lsq_lr` must be > 0, got {self.lsq_lr}")
