"""Inference modules over packed integer weights, calling the compiled kernels.

``PackedLinear`` replaces ``nn.Linear`` and transformers' ``Conv1D`` (whose canonical ``(out, in)``
matrix, :mod:`lightning_compress.layout`, is exactly a Linear weight), ``PackedConv2d`` replaces
``nn.Conv2d``, after :func:`lightning_compress.export.load_into`. Weights are int8 (or row-packed
int4) with one fp32 scale per output channel, stored dense or as compressed rows
(:mod:`lightning_compress.ops.packed`). Convolutions unfold their input (im2col) and go through the
same linear kernels. Where the layer was trained with 8-bit activations, its output is
fake-quantized with the recorded range, as in training, so the packed model computes what the
fake-quantized model computed.

:func:`unpackable_reason` says, for any other layer, why it stays fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.layout import layout_of
from lightning_compress.ops.packed import (
    check_sparse_layout,
    hugepage_copy,
    int_linear,
    pack_rows_int4,
    sparse_int_linear,
    sparse_layout,
)


class PackedWeight(nn.Module):
    """An integer weight [N, K] with per-row scales and an optional bias, and its product with x.

    Args:
        q: int8 [N, K] integers (values in [-8, 7] when ``bits`` is 4).
        scale: float32 [N].
        bias: float32 [N] or None.
        bits: The container: 8, or 4 (which also holds 2- and 3-bit integers).
        sparse: Keep compressed rows of the non-zeros (int8 values) instead of the dense matrix.
        act: Output fake quantization ``{"scale", "zero_point", "bits"}`` or None.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        sparse: bool,
        act: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits = bits
        self.sparse = sparse
        self.act = act
        act = act or {"scale": 0.0, "zero_point": 0, "bits": 8}
        self._act_args = (float(act["scale"]), int(act["zero_point"]), 2 ** int(act["bits"]) - 1)
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        if sparse:
            row_ptr, col, values = sparse_layout(q)
            check_sparse_layout(row_ptr, col, values, (self.out_features, self.in_features))
            self.register_buffer("row_ptr", row_ptr)
            self.register_buffer("col", hugepage_copy(col))
            self.register_buffer("values", hugepage_copy(values))
        else:
            self.register_buffer("qweight", hugepage_copy(q if bits == 8 else pack_rows_int4(q)))

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d`` [B, K] float32 -> [B, N] float32 (output fake-quantized where trained so)."""
        act_args = self._act_args
        if self.sparse:
            return sparse_int_linear(
                x2d,
                self.row_ptr,
                self.col,
                self.values,
                self.scale,
                self.bias,
                self.in_features,
                *act_args,
            )
        return int_linear(x2d, self.qweight, self.scale, self.bias, self.bits, *act_args)

    def extra_repr(self) -> str:
        layout = "sparse" if self.sparse else "dense"
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, {layout}"


class PackedLinear(PackedWeight):
    """Drop-in for ``nn.Linear`` and transformers' ``Conv1D`` (any leading dimensions; float32
    math, output in x's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32:
            return self.matmul(x)
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]).float()).reshape(*lead, self.out_features)
        return y.to(x.dtype)


class PackedConv2d(PackedWeight):
    """Drop-in for a ``groups=1``, zero-padded ``nn.Conv2d``: unfold, then the linear kernels."""

    def __init__(self, *args: Any, conv: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_size = tuple(conv["kernel_size"])
        self.stride = tuple(conv["stride"])
        self.padding = tuple(conv["padding"])
        self.dilation = tuple(conv["dilation"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        x4 = x if batched else x.unsqueeze(0)
        b, _, h, w = x4.shape
        out_h = h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1
        out_w = w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1
        out_h, out_w = out_h // self.stride[0] + 1, out_w // self.stride[1] + 1
        cols = F.unfold(x4.float(), self.kernel_size, self.dilation, self.padding, self.stride)
        y = self.matmul(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        y = y.view(b, out_h * out_w, self.out_features).transpose(1, 2)
        y = y.reshape(b, self.out_features, out_h, out_w).to(x.dtype)
        return y if batched else y.squeeze(0)


def conv_params(conv: nn.Conv2d) -> dict[str, Any]:
    """The geometry a PackedConv2d needs, as JSON-friendly lists."""
    return {
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
    }


# Types whose forward is ``F.linear(x, W, bias)`` with ``W`` the canonical (out, in) matrix of
# their registered weight; transformers' Conv1D computes ``x @ weight + bias`` over an (in, out)
# weight, the same product. Named by class or qualified name, as in lightning_compress.layout,
# so that transformers stays optional.
LINEAR_TYPES: tuple[type[nn.Module] | str, ...] = (nn.Linear, "transformers.pytorch_utils.Conv1D")


def _is_linear(module: nn.Module) -> bool:
    return any(
        key is cls or key == f"{cls.__module__}.{cls.__qualname__}"
        for cls in type(module).__mro__
        for key in LINEAR_TYPES
    )


def unpackable_reason(module: nn.Module) -> str | None:
    """Why ``module`` has no packed replacement, worded for the report; None when it has one.

    Packed: the :data:`LINEAR_TYPES` with a registered 2-D weight, and ``nn.Conv2d`` with
    ``groups=1``, zero padding and numeric padding.
    """
    if _is_linear(module) and layout_of(module) is not None and module.weight.dim() == 2:
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            depthwise = module.groups == module.in_channels
            what = "depthwise" if depthwise else "grouped"
            return f"{what} convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"Conv2d with padding={module.padding!r}"
        return None
    return f"{type(module).__name__}: no packed kernel"


def packed_kind(module: nn.Module) -> str:
    """The packed kind of a module :func:`unpackable_reason` accepts: "conv2d" or "linear"."""
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"
