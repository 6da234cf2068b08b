"""What a compression method hands to export: one typed record per compressed layer.

A method (QAT today; weight sharing and low rank next) describes each layer it compressed as a
:class:`LayerRecord` of its own kind, and a :class:`CompressionRecord` gathers them by parameter
name. Export packs a record by its type (one packer per kind), so a new kind of compressed layer
is a new record class here and one packer in :mod:`lightning_compress.export`, and export never
reads a callback's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_compress.quantization.fake import channel_view, quantize_weight, weight_qmax

if TYPE_CHECKING:
    from lightning_compress.quantization.fake import ActivationObserver


@dataclass(frozen=True)
class ActivationRange:
    """The 8-bit asymmetric range of a layer's output, as training fake-quantized it.

    Args:
        scale: Step between two levels.
        zero_point: The level of 0.0, in ``[0, qmax]``.
        bits: Activation bits (8).
    """

    scale: float
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        """The largest level: 2^bits - 1."""
        return 2**self.bits - 1

    @classmethod
    def from_observer(cls, observer: ActivationObserver) -> ActivationRange | None:
        """The observer's current range; None before it has seen a batch."""
        if not observer.initialized:
            return None
        scale, zero_point = observer.qparams()
        return cls(float(scale), int(zero_point), int(observer.bits))


@dataclass(frozen=True, eq=False)
class LayerRecord:
    """One compressed layer. Subclasses set :attr:`kind` and hold what their packer stores.

    Args:
        name: The weight's qualified parameter name (``"net.fc1.weight"``) in the model the
            record was taken from.
    """

    kind: ClassVar[str]
    name: str


@dataclass(frozen=True, eq=False)
class QuantizedLayer(LayerRecord):
    """Integer weights with one scale per output channel: ``weight ~= values * scale[:, None]``.

    Args:
        name: The weight's qualified parameter name.
        values: int8 integers of the weight's shape, in ``[-qmax, qmax]`` for ``bits``.
        scale: float32 [out_channels]. For a Conv quantized with its BatchNorm folded in, the
            fold is already divided out, so ``values * scale`` is the Conv's own weight.
        bits: Weight bits, 2 to 8.
        activation: The layer output's range where activations were quantized, else None.

    Raises:
        ValueError: Values, scale and bits that do not describe one quantized weight.
    """

    kind: ClassVar[str] = "int"
    values: torch.Tensor = dataclasses.field(repr=False)
    scale: torch.Tensor = dataclasses.field(repr=False)
    bits: int
    activation: ActivationRange | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"{self.name}: `bits` must be in [2, 8], got {self.bits}")
        if self.values.dtype != torch.int8 or self.values.dim() == 0:
            raise ValueError(
                f"{self.name}: `values` must be an int8 tensor with output channels on dim 0, "
                f"got {self.values.dtype} {tuple(self.values.shape)}"
            )
        if self.scale.dtype != torch.float32 or self.scale.shape != self.values.shape[:1]:
            raise ValueError(
                f"{self.name}: `scale` must be float32 [{self.values.shape[0]}], "
                f"got {self.scale.dtype} {tuple(self.scale.shape)}"
            )
        qmax = weight_qmax(self.bits)
        if self.values.numel() and int(self.values.abs().max()) > qmax:
            raise ValueError(
                f"{self.name}: `values` must lie in [-{qmax}, {qmax}] for {self.bits} bits"
            )

    @classmethod
    def from_weight(
        cls,
        name: str,
        weight: torch.Tensor,
        bits: int,
        *,
        step: torch.Tensor | None = None,
        fold: torch.Tensor | None = None,
        activation: ActivationRange | None = None,
    ) -> QuantizedLayer:
        """Quantizes a weight per output channel (on the CPU in the record).

        Args:
            name: The weight's qualified parameter name.
            weight: The weight as it is quantized: with its BatchNorm folded in where ``fold``
                is given.
            bits: 2 to 8.
            step: Learned per-channel steps (LSQ) instead of scales from the weight's range.
            fold: The per-channel BatchNorm factor the weight was multiplied by; divided out of
                the scale, so the record describes the layer's own weight.
            activation: The output's range, where activations were quantized.
        """
        q, scale = quantize_weight(weight, bits, step)
        scale = scale.cpu()
        if fold is not None:
            scale = scale / fold.detach().reshape(-1).float().cpu()
        return cls(name, q.cpu(), scale, bits, activation)

    def dequantize(self) -> torch.Tensor:
        """``values * scale`` per output channel, float32."""
        return self.values.float() * channel_view(self.scale, self.values)


@dataclass(frozen=True, eq=False)
class SharedLayer(LayerRecord):
    """Weight sharing: each weight is one of a small codebook's values, or an exact zero.

    ``weight[r, ...] = codebook[r // (out_channels // groups), indices[r, ...]]`` where ``mask``
    is set, and exactly 0 where it is not (pruned weights are not a centroid).

    Args:
        name: The weight's qualified parameter name.
        codebook: float32 [groups, 2**bits]: the centroids of each group of consecutive output
            channels.
        indices: uint8 of the weight's shape, each in ``[0, 2**bits)`` (0 where ``mask`` is
            not set).
        mask: bool of the weight's shape: the weights that are not exact zeros.
        bits: Index bits, 1 to 8.
        activation: The layer output's range where activations were quantized, else None.

    Raises:
        ValueError: Codebook, indices and mask that do not describe one shared weight.
    """

    kind: ClassVar[str] = "codebook"
    codebook: torch.Tensor = dataclasses.field(repr=False)
    indices: torch.Tensor = dataclasses.field(repr=False)
    mask: torch.Tensor = dataclasses.field(repr=False)
    bits: int
    activation: ActivationRange | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"{self.name}: `bits` must be in [1, 8], got {self.bits}")
        if self.indices.dtype != torch.uint8 or self.indices.dim() < 2:
            raise ValueError(
                f"{self.name}: `indices` must be a uint8 tensor with output channels on dim 0, "
                f"got {self.indices.dtype} {tuple(self.indices.shape)}"
            )
        if self.mask.dtype != torch.bool or self.mask.shape != self.indices.shape:
            raise ValueError(
                f"{self.name}: `mask` must be bool {tuple(self.indices.shape)}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        levels = 2**self.bits
        rows = self.indices.shape[0]
        if (
            self.codebook.dtype != torch.float32
            or self.codebook.dim() != 2
            or self.codebook.shape[1] != levels
            or not 1 <= self.codebook.shape[0] <= rows
            or rows % self.codebook.shape[0]
        ):
            raise ValueError(
                f"{self.name}: `codebook` must be float32 [groups, {levels}] with groups "
                f"dividing {rows}, got {self.codebook.dtype} {tuple(self.codebook.shape)}"
            )
        if self.indices.numel() and int(self.indices.max()) >= levels:
            raise ValueError(f"{self.name}: `indices` point past the codebook's {levels} entries")

    @property
    def groups(self) -> int:
        """How many codebooks: consecutive output channels share one."""
        return int(self.codebook.shape[0])

    def dequantize(self) -> torch.Tensor:
        """Each weight's centroid (0 where ``mask`` is not set), float32."""
        rows = self.indices.shape[0]
        per_row = self.codebook.repeat_interleave(rows // self.groups, dim=0)
        flat = self.indices.reshape(rows, -1).long()
        values = per_row.gather(1, flat).reshape(self.indices.shape)
        return values * self.mask


class CompressionRecord(Mapping[str, LayerRecord]):
    """The compressed layers of one model, by weight name; what export packs.

    Args:
        layers: One record per compressed weight (names unique).
        root: The model the names are qualified in (so :meth:`relative_to` can find a
            submodule's names); None when the names are the packed model's own.

    Raises:
        ValueError: Two records for the same weight.
    """

    def __init__(self, layers: Iterable[LayerRecord], root: nn.Module | None = None) -> None:
        self._layers: dict[str, LayerRecord] = {}
        for layer in layers:
            if layer.name in self._layers:
                raise ValueError(f"two records for {layer.name!r}")
            self._layers[layer.name] = layer
        self.root = root

    def __getitem__(self, name: str) -> LayerRecord:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        kinds = sorted({layer.kind for layer in self._layers.values()})
        return f"CompressionRecord({len(self)} layers, kinds {kinds})"

    def relative_to(self, model: nn.Module) -> CompressionRecord:
        """The records of ``model``'s weights, named as in ``model``.

        Args:
            model: The root the record was taken from, or one of its submodules (a
                LightningModule's ``net``).

        Raises:
            ValueError: ``model`` is not part of the root.
        """
        if self.root is None or self.root is model:
            return self
        prefix = next((f"{n}." for n, m in self.root.named_modules() if m is model and n), None)
        if prefix is None:
            raise ValueError("`model` is not part of the module the record was taken from")
        return CompressionRecord(
            (
                dataclasses.replace(layer, name=name[len(prefix) :])
                for name, layer in self._layers.items()
                if name.startswith(prefix)
            ),
            root=model,
        )


@runtime_checkable
class RecordSource(Protocol):
    """What produces a record (a :class:`~lightning_compress.QATCallback` after ``fit``)."""

    @property
    def record(self) -> CompressionRecord | None: ...
