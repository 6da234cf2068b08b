"""The settings of quantization-aware training, validated once, with no Trainer in sight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_compress.clock import Step, parse_step
from lightning_compress.config import MethodConfig

METHODS = ("ste", "lsq")
SCHEMES = ("uniform", "kmeans")
# Bits per scheme: a 1-bit symmetric integer grid is {0} alone; a 2-entry codebook is useful.
BITS = {"uniform": (2, 8), "kmeans": (1, 8)}


@dataclass(frozen=True)
class QATConfig(MethodConfig):
    """What :class:`~lightning_compress.QATCallback` is told; its keyword arguments, one to one.

    Args:
        bits: Weight bits, 2 to 8 (``scheme="uniform"``); index bits, 1 to 8 (``"kmeans"``).
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
        scheme: ``"uniform"`` (integers on a per-channel grid) or ``"kmeans"`` (weight sharing,
            Deep Compression: ``2**bits`` trained centroids per codebook, a uint8 index per
            weight; exact zeros stay zeros and are not clustered).
        groups: Codebooks per layer (``"kmeans"``): consecutive output channels share one;
            must divide every targeted layer's output channels. 1: one per layer.
        refresh: Period on the step clock at which every weight is re-assigned to its nearest
            centroid (``"kmeans"``; ``"Nep"``, ``"Nit"`` or an int), None: never.
        kmeans_lr: Learning rate of the centroids (``"kmeans"``), trained by the callback's
            own Adam on Deep Compression's gradient (the sum of the assigned weights').

    Raises:
        ValueError: An argument out of range, an unknown method or scheme, a freeze step before
            ``start`` in the same unit, or options the scheme does not take.
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
    scheme: str = "uniform"
    # Per-channel-group codebooks cost a codebook each but fit channels of different ranges.
    groups: int = 1
    # Re-assigning lets the dense weight (trained straight through) change cluster.
    refresh: str | int | Step | None = None
    # Adam is scale-free: a centroid's gradient is a sum over up to millions of weights.
    kmeans_lr: float = 1e-4

    def state_key_fields(self) -> dict[str, Any]:
        """The state key; ``scheme`` joins it only when not the default, so the keys of
        uniform checkpoints written before weight sharing existed do not change."""
        fields = super().state_key_fields()
        if self.scheme != "uniform":
            fields["scheme"] = self.scheme
        return fields

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"`scheme` must be one of {SCHEMES}, got {self.scheme!r}")
        lo, hi = BITS[self.scheme]
        for where, value in [
            ("bits", self.bits),
            *((f"overrides[{k!r}]", v) for k, v in (self.overrides or {}).items()),
        ]:
            if not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(
                    f"`{where}` must be an integer in [{lo}, {hi}], got {value!r} "
                    f"(scheme={self.scheme!r})"
                )
        self._check_scheme_options()
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
        refresh = None if self.refresh is None else parse_step(self.refresh, "refresh")
        if refresh is not None and refresh.value == 0:
            raise ValueError("`refresh` must be a period > 0 or None (never), got 0")
        self._normalize("refresh", refresh)

    def _check_scheme_options(self) -> None:
        if self.scheme == "kmeans":
            if self.method != "ste":
                raise ValueError(
                    f"`method`={self.method!r} does not apply to scheme='kmeans' (its centroids "
                    "are trained on their summed gradients); use method='ste'"
                )
            if self.fold_bn:
                raise ValueError(
                    "`fold_bn`=True is not supported with scheme='kmeans' (a codebook of the "
                    "folded weight would change with the BatchNorm statistics); use None or False"
                )
            if not isinstance(self.groups, int) or self.groups < 1:
                raise ValueError(f"`groups` must be an integer >= 1, got {self.groups!r}")
            if self.kmeans_lr <= 0:
                raise ValueError(f"`kmeans_lr` must be > 0, got {self.kmeans_lr}")
            return
        for arg, default in (("groups", 1), ("refresh", None)):
            if getattr(self, arg) != default:
                raise ValueError(
                    f"`{arg}`={getattr(self, arg)!r} only applies to scheme='kmeans', "
                    f"got scheme={self.scheme!r}"
                )
