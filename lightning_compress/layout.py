"""One notion of a weight's layout: which axis is the output and which the reduction.

A ``nn.Linear`` weight is ``(out, in)``, a convolution's ``(out, in / groups, *kernel)``, an
attention in-projection ``(3 * embed, embed)``, and transformers' ``Conv1D`` stores its weight
transposed, ``(in, out)``, computing ``x @ W + b``. Everything that treats a weight as a matrix
(targeting, N:M groups, per-channel quantization scales, channel pruning, packing, the kernels)
asks this module, so a new layer type is one :func:`register_layout` call and can never be
compressed along the wrong axis.

The canonical view of a weight is :meth:`WeightLayout.matrix`: ``(out, reduction)``, output
channels on rows, everything that is summed over in the columns, in the order the kernels read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightLayout:
    """Where a weight keeps its output and reduction axes.

    Args:
        out_axis: The axis of output channels (features).
        in_axis: The axis of input channels (features): N:M groups run along it, and with the
            remaining (kernel) axes it forms the reduction dimension.
    """

    out_axis: int = 0
    in_axis: int = 1

    def __post_init__(self) -> None:
        if self.out_axis == self.in_axis or min(self.out_axis, self.in_axis) < 0:
            raise ValueError(
                f"`out_axis` and `in_axis` must be distinct non-negative axes, got "
                f"{self.out_axis} and {self.in_axis}"
            )

    @property
    def standard(self) -> bool:
        """Output on axis 0 and input on axis 1, like ``nn.Linear`` and ``nn.Conv*``."""
        return (self.out_axis, self.in_axis) == (0, 1)

    def _order(self, ndim: int) -> list[int]:
        rest = [a for a in range(ndim) if a not in (self.out_axis, self.in_axis)]
        return [self.out_axis, self.in_axis, *rest]

    def out_features(self, weight: torch.Tensor) -> int:
        return int(weight.shape[self.out_axis])

    def in_features(self, weight: torch.Tensor) -> int:
        return int(weight.shape[self.in_axis])

    def canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as ``(out, in, *kernel)`` (a view): the standard layout's axis order."""
        return weight if self.standard else weight.permute(self._order(weight.dim()))

    def uncanonical(self, canonical: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`canonical` (a view)."""
        if self.standard:
            return canonical
        order = self._order(canonical.dim())
        return canonical.permute([order.index(a) for a in range(canonical.dim())])

    def canonical_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self._order(len(shape)))

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as ``(out, reduction)``: a view for standard layouts, else a copy."""
        moved = self.canonical(weight)
        return moved.reshape(moved.shape[0], -1)

    def from_matrix(
        self, matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]
    ) -> torch.Tensor:
        """The inverse of :meth:`matrix`: a ``(out, reduction)`` tensor back in ``shape``."""
        moved = matrix.reshape(self.canonical_shape(tuple(shape)))
        return self.uncanonical(moved).contiguous()

    def per_channel(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """Per-output-channel ``values`` shaped to broadcast against a weight of ``ndim`` dims."""
        shape = [1] * ndim
        shape[self.out_axis] = -1
        return values.reshape(shape)

    def inputs_last(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the input axis moved last (N:M groups are runs along it)."""
        return weight.movedim(self.in_axis, -1)

    def inputs_back(self, moved: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`inputs_last`."""
        return moved.movedim(-1, self.in_axis)


STANDARD = WeightLayout(0, 1)
TRANSPOSED = WeightLayout(1, 0)

# (module type or "module.QualName", parameter leaf) -> layout. Classes named by string are
# matched without importing their package, so optional libraries (transformers) stay optional.
_LAYOUTS: dict[tuple[type[nn.Module] | str, str], WeightLayout] = {}


def register_layout(
    module_type: type[nn.Module] | str, leaf: str = "weight", layout: WeightLayout = STANDARD
) -> None:
    """Declares that ``module_type``'s parameter ``leaf`` is a compressible weight.

    Registered weights are targeted by default, quantized per output channel, grouped for N:M
    along their input axis and packed through :meth:`WeightLayout.matrix`.

    Args:
        module_type: The class, or its qualified name (``"transformers.pytorch_utils.Conv1D"``)
            to match it without importing its package. Subclasses match too.
        leaf: The parameter's name on the module.
        layout: Where the weight keeps its output and input axes.
    """
    _LAYOUTS[module_type, leaf] = layout


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def layouts_of(module: nn.Module) -> dict[str, WeightLayout]:
    """The registered weights of ``module`` itself (leaf name -> layout), present ones only."""
    found: dict[str, WeightLayout] = {}
    for cls in type(module).__mro__:
        for (key, leaf), layout in _LAYOUTS.items():
            if leaf in found or not (key is cls or key == _qualname(cls)):
                continue
            if isinstance(getattr(module, leaf, None), torch.Tensor):
                found[leaf] = layout
    return found


def layout_of(module: nn.Module, leaf: str = "weight") -> WeightLayout | None:
    """The layout of ``module``'s parameter ``leaf``, or None when it is not registered."""
    return layouts_of(module).get(leaf)


def registered_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, WeightLayout]]:
    """Every registered weight in ``model``: (qualified name, module, leaf, layout).

    A parameter shared by several modules is yielded once per module; callers that target
    parameters resolve the sharing (see :mod:`lightning_compress.targets`).
    """
    for module_name, module in model.named_modules():
        for leaf, layout in layouts_of(module).items():
            yield (f"{module_name}.{leaf}" if module_name else leaf), module, leaf, layout


def layout_for_name(model: nn.Module, name: str) -> WeightLayout:
    """The layout of the weight called ``name`` in ``model`` (standard when not registered)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return layout_of(module, leaf) or STANDARD


for _linear_like in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layout(_linear_like)
for _leaf in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
    register_layout(nn.MultiheadAttention, _leaf)
register_layout("transformers.pytorch_utils.Conv1D", "weight", TRANSPOSED)
