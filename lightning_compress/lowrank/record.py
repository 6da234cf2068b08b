"""The export record of a low-rank layer: its two factors, in the weight's canonical order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lightning_compress.quantization.record import ActivationRange, LayerRecord


@dataclass(frozen=True, eq=False)
class LowRankLayer(LayerRecord):
    """A weight stored as two thin factors: ``matrix ~= first @ second``.

    The matrix is the weight's canonical ``(out, in * kernel)`` view
    (:meth:`~lightning_compress.layout.WeightLayout.matrix`): for a Conv2d, ``second`` reshaped
    to ``(rank, in, kh, kw)`` is a convolution with ``rank`` filters and ``first`` a 1x1
    convolution after it; for transformers' ``Conv1D`` the transpose of its ``(in, out)`` weight.

    Args:
        name: The weight's qualified parameter name.
        first: float32 ``(out, rank)``.
        second: float32 ``(rank, in * kernel)``.
        bits: Quantize each factor per output channel to this many bits when packed (8 or 4;
            2 to 8 are accepted, the widths QAT trains, when the layer's QAT bits are taken),
            or None to store them fp32.
        activation: The layer output's 8-bit range where QAT quantized it (pack takes it from
            the QAT record), else None.

    Raises:
        ValueError: Factors that do not multiply, a rank of zero, or bits other than 2 to 8 or
            None.
    """

    kind: ClassVar[str] = "lowrank"
    first: torch.Tensor = dataclasses.field(repr=False)
    second: torch.Tensor = dataclasses.field(repr=False)
    bits: int | None = None
    activation: ActivationRange | None = None

    def __post_init__(self) -> None:
        a, b = self.first, self.second
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.shape[1] == 0:
            raise ValueError(
                f"{self.name}: the factors must be (out, rank) and (rank, in) with rank >= 1, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{self.name}: the factors must be floating point")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(
                f"{self.name}: `bits` must be 8, 4 (2 to 8) or None, got {self.bits!r}"
            )

    @property
    def rank(self) -> int:
        return int(self.first.shape[1])

    def matrix(self) -> torch.Tensor:
        """``first @ second``: the weight's canonical matrix, float32."""
        return self.first.float() @ self.second.float()
