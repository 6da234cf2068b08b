"""Inference modules over packed integer weights, calling the compiled kernels.

``PackedLinear`` replaces ``nn.Linear`` and transformers' ``Conv1D`` (whose canonical ``(out, in)``
matrix, :mod:`lightning_compress.layout`, is exactly a Linear weight), ``PackedConv2d`` replaces
``nn.Conv2d``, after :func:`lightning_compress.export.load_into`; ``PackedLowRank`` replaces any of
them whose weight was stored as two low-rank factors. Weights are int8 (or row-packed
int4) with one fp32 scale per output channel, stored dense or as compressed rows
(:mod:`lightning_compress.ops.packed`). Convolutions unfold their input (im2col) and go through the
same linear kernels. Where the layer was trained with 8-bit activations, its output is
fake-quantized with the recorded range, as in training, so the packed model computes what the
fake-quantized model computed.

:func:`unpackable_reason` says, for any other layer, why it stays fp32.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.layout import layout_of
from lightning_compress.ops.dyn_linear import (
    MAX_IN_FEATURES,
    bitmask_dyn_linear,
    bitmask_layout,
    block_dyn_linear,
    block_layout,
)
from lightning_compress.ops.lut import lut_layout, lut_sparse_linear
from lightning_compress.ops.packed import (
    _fake_quant_output,
    check_sparse_layout,
    hugepage_copy,
    int_linear,
    pack_rows_int4,
    sparse_int_linear,
    sparse_layout,
)

# How a PackedWeight computes its product (:attr:`PackedWeight.impl`):
#   kernel    fp32 activations against the stored integers: dense int8/int4 or compressed rows
#   fp32      the dequantized weight through F.linear / F.conv2d (what the fp32 model runs)
#   bitmask   ops.dyn_linear's bitmask layout, activations quantized per row (batch 1 to ~8)
#   block     ops.dyn_linear's block layout, activations quantized per row (batches)
#   qdynamic  torch's prepacked int8 dynamic linear (fbgemm/oneDNN), as quantize_dynamic runs it
# The first two compute what was trained; the others round the activations to 8 bits per row.
IMPLEMENTATIONS = ("kernel", "fp32", "bitmask", "block", "qdynamic")
EXACT_IMPLEMENTATIONS = ("kernel", "fp32")


def implementations(in_features: int, exact: bool = False) -> tuple[str, ...]:
    """The implementations a layer with ``in_features`` inputs can use on this build."""
    if exact:
        return EXACT_IMPLEMENTATIONS
    out = list(EXACT_IMPLEMENTATIONS)
    if in_features <= MAX_IN_FEATURES:
        out += ["bitmask", "block"]
    if torch.backends.quantized.engine not in ("none", "qnnpack"):
        out.append("qdynamic")
    return tuple(out)


class PackedWeight(nn.Module):
    """An integer weight [N, K] with per-row scales and an optional bias, and its product with x.

    Args:
        q: int8 [N, K] integers (values in [-8, 7] when ``bits`` is 4).
        scale: float32 [N].
        bias: float32 [N] or None.
        bits: The container: 8, or 4 (which also holds 2- and 3-bit integers).
        sparse: Keep compressed rows of the non-zeros (int8 values) instead of the dense matrix.
        act: Output fake quantization ``{"scale", "zero_point", "bits"}`` or None.
        impl: How the product is computed (:data:`IMPLEMENTATIONS`); "kernel" by default.
            ``load_into(..., batch_size=...)`` picks the fastest one measured on this machine.

    Raises:
        ValueError: An unknown ``impl``, or one the layer cannot use (:func:`implementations`).
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        sparse: bool,
        act: dict[str, Any] | None = None,
        impl: str = "kernel",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        if impl not in implementations(self.in_features):
            raise ValueError(
                f"`impl` must be one of {implementations(self.in_features)} for a layer with "
                f"{self.in_features} inputs, got {impl!r}"
            )
        self.bits = bits
        self.sparse = sparse
        self.impl = impl
        self.act = act
        act = act or {"scale": 0.0, "zero_point": 0, "bits": 8}
        self._act_args = (float(act["scale"]), int(act["zero_point"]), 2 ** int(act["bits"]) - 1)
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        if impl != "kernel":
            self._build(impl, q)
        elif sparse:
            row_ptr, col, values = sparse_layout(q)
            check_sparse_layout(row_ptr, col, values, (self.out_features, self.in_features))
            self.register_buffer("row_ptr", row_ptr)
            self.register_buffer("col", hugepage_copy(col))
            self.register_buffer("values", hugepage_copy(values))
        else:
            self.register_buffer("qweight", hugepage_copy(q if bits == 8 else pack_rows_int4(q)))

    def _build(self, impl: str, q: torch.Tensor) -> None:
        """The buffers of an implementation other than "kernel"."""
        if impl == "fp32":
            self.register_buffer("weight", q.float() * self.scale[:, None])
        elif impl in ("bitmask", "block"):
            layout = (bitmask_layout if impl == "bitmask" else block_layout)(q)
            names = ("row_ptr", impl_tensor(impl), "values", "row_sum")
            for name, t in zip(names, layout, strict=True):
                self.register_buffer(name, hugepage_copy(t) if name == "values" else t)
        else:  # qdynamic
            zeros = torch.zeros(self.out_features, dtype=torch.int64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensors are deprecated, the op is not
                wq = torch._make_per_channel_quantized_tensor(q, self.scale.double(), zeros, 0)
                self._prepacked = torch.ops.quantized.linear_prepack(wq, self.bias)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d`` [B, K] float32 -> [B, N] float32 (output fake-quantized where trained so)."""
        act_args = self._act_args
        impl = self.impl
        if impl != "kernel":
            if impl == "fp32":
                return _fake_quant_output(F.linear(x2d, self.weight, self.bias), *act_args)
            if impl == "qdynamic":
                y = torch.ops.quantized.linear_dynamic(x2d, self._prepacked, True)
                return _fake_quant_output(y, *act_args)
            op = bitmask_dyn_linear if impl == "bitmask" else block_dyn_linear
            return op(
                x2d,
                self.row_ptr,
                getattr(self, impl_tensor(impl)),
                self.values,
                self.row_sum,
                self.scale,
                self.bias,
                self.in_features,
                *act_args,
            )
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
        impl = "" if self.impl == "kernel" else f", impl={self.impl}"
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, {layout}{impl}"


def impl_tensor(impl: str) -> str:
    """The name of the buffer that holds the positions of a dynamic implementation's layout."""
    return "mask" if impl == "bitmask" else "group"


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
        if self.impl == "fp32":
            weight = self.weight.view(self.out_features, -1, *self.kernel_size)
            y = F.conv2d(x4.float(), weight, self.bias, self.stride, self.padding, self.dilation)
            y = _fake_quant_output(y, *self._act_args).to(x.dtype)
            return y if batched else y.squeeze(0)
        rows, (b, out_h, out_w) = _unfold_rows(
            x4, self.kernel_size, self.stride, self.padding, self.dilation
        )
        y = _rows_to_image(self.matmul(rows), b, out_h, out_w).to(x.dtype)
        return y if batched else y.squeeze(0)


class PackedLowRank(nn.Module):
    """Drop-in for ``nn.Linear``, transformers' ``Conv1D`` and a ``groups=1`` ``nn.Conv2d`` whose
    canonical ``(out, in * kernel)`` weight is stored as two factors, ``W = first @ second``.

    ``y = first (second x) + bias``, one op call per product: fp32 factors through ``F.linear``,
    or for a Conv2d a convolution with ``rank`` filters of the layer's own geometry and then a
    1x1 convolution; integer factors (one scale per row) through two dense
    :class:`PackedWeight`, a Conv2d unfolding its input first as :class:`PackedConv2d` does.

    Args:
        first: float32 ``(out, rank)``, or its int8 integers when ``bits`` is set.
        second: float32 ``(rank, in * kernel)``, or its int8 integers.
        bias: float32 [out] or None.
        bits: None for fp32 factors, else the integers' container: 8, or 4 (which also holds
            2- and 3-bit integers).
        scales: float32 per-row scales of ``first`` [out] and ``second`` [rank]; integer
            factors only.
        conv: The Conv2d's geometry (:func:`conv_params`); None for a linear layer.
        act: Output fake quantization ``{"scale", "zero_point", "bits"}`` or None.

    Raises:
        ValueError: Factors that do not multiply, a reduction that is not ``in * kh * kw``, or
            ``scales`` given without ``bits`` (or missing with it).
    """

    def __init__(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int | None = None,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        conv: dict[str, Any] | None = None,
        act: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if first.dim() != 2 or second.dim() != 2 or first.shape[1] != second.shape[0]:
            raise ValueError(
                f"`first` and `second` must be (out, rank) and (rank, in * kernel), got "
                f"{tuple(first.shape)} and {tuple(second.shape)}"
            )
        if (bits is None) != (scales is None):
            raise ValueError(f"`scales` go with integer factors (`bits` set), got bits={bits!r}")
        self.out_features, self.rank = first.shape
        self.in_features = second.shape[1]
        self.bits = bits
        self.act = act
        self.kernel_size = None if conv is None else tuple(conv["kernel_size"])
        if conv is not None:
            self.stride = tuple(conv["stride"])
            self.padding = tuple(conv["padding"])
            self.dilation = tuple(conv["dilation"])
            taps = self.kernel_size[0] * self.kernel_size[1]
            if self.in_features % taps:
                raise ValueError(
                    f"`second` has {self.in_features} columns, not a multiple of the kernel's "
                    f"{taps} taps"
                )
        if scales is not None:
            self.first = PackedWeight(first, scales[0], bias, bits, False, act)
            self.second = PackedWeight(second, scales[1], None, bits, False)
            return
        act = act or {"scale": 0.0, "zero_point": 0, "bits": 8}
        self._act_args = (float(act["scale"]), int(act["zero_point"]), 2 ** int(act["bits"]) - 1)
        first, second = first.float().contiguous(), second.float().contiguous()
        if conv is not None:  # as convolution weights: rank filters, then a 1x1 mix of them
            second = second.reshape(self.rank, -1, *self.kernel_size)
            first = first.reshape(self.out_features, self.rank, 1, 1)
        self.register_buffer("first", first)
        self.register_buffer("second", second)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size is not None:
            return self._conv(x)
        if self.bits is None:
            y = F.linear(F.linear(x.float(), self.second), self.first, self.bias)
            return self._fake_quant(y).to(x.dtype)
        lead = x.shape[:-1]
        y = self.first.matmul(self.second.matmul(x.reshape(-1, x.shape[-1]).float()))
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        x4 = x if batched else x.unsqueeze(0)
        if self.bits is None:
            mid = F.conv2d(x4.float(), self.second, None, self.stride, self.padding, self.dilation)
            y = self._fake_quant(F.conv2d(mid, self.first, self.bias))
        else:
            rows, (b, out_h, out_w) = _unfold_rows(
                x4, self.kernel_size, self.stride, self.padding, self.dilation
            )
            y = _rows_to_image(self.first.matmul(self.second.matmul(rows)), b, out_h, out_w)
        y = y.to(x.dtype)
        return y if batched else y.squeeze(0)

    def _fake_quant(self, y: torch.Tensor) -> torch.Tensor:
        """The fp32 path's output on the recorded 8-bit grid, as the integer kernels do it."""
        scale, zero_point, qmax = self._act_args
        if scale == 0:
            return y
        return torch.fake_quantize_per_tensor_affine(y, scale, zero_point, 0, qmax)

    def extra_repr(self) -> str:
        factors = "fp32" if self.bits is None else f"int{self.bits}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, {factors}"


class SharedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` / ``Conv1D`` whose weights are shared: compressed rows of
    centroid indices and the codebooks, multiplied by ``ops.lut.lut_sparse_linear`` (each index
    looked up in registers), which computes with the codebook's exact values.

    Args:
        codebook: float32 [groups, 2**bits].
        indices: uint8 [N, K], each weight's centroid (read where ``mask`` is set).
        mask: bool [N, K], the weights that are not exact zeros.
        bias: float32 [N] or None.
        act: Output fake quantization ``{"scale", "zero_point", "bits"}`` or None.
    """

    impl = "lut"

    def __init__(
        self,
        codebook: torch.Tensor,
        indices: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None,
        act: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(v) for v in indices.shape)
        self.bits = int(codebook.shape[1]).bit_length() - 1
        row_ptr, col, idx, books, group_rows = lut_layout(codebook, indices, mask)
        self.group_rows = group_rows
        for name, t in zip(
            ("row_ptr", "col", "idx", "codebook"), (row_ptr, col, idx, books), strict=True
        ):
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.act = act
        act = act or {"scale": 0.0, "zero_point": 0, "bits": 8}
        self._act_args = (float(act["scale"]), int(act["zero_point"]), 2 ** int(act["bits"]) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1]).float()
        y = lut_sparse_linear(
            x2d,
            self.row_ptr,
            self.col,
            self.idx,
            self.codebook,
            self.group_rows,
            self.bias,
            self.in_features,
            *self._act_args,
        )
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        groups = self.codebook.shape[0]
        return (
            f"in={self.in_features}, out={self.out_features}, {2**self.bits} centroids x "
            f"{groups} groups, impl=lut"
        )


def _unfold_rows(
    x4: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """im2col: one float32 row [in * kh * kw] per output position, and (batch, out_h, out_w)."""
    b, _, h, w = x4.shape
    out_h = h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1
    out_w = w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1
    out_h, out_w = out_h // stride[0] + 1, out_w // stride[1] + 1
    cols = F.unfold(x4.float(), kernel_size, dilation, padding, stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (b, out_h, out_w)


def _rows_to_image(y: torch.Tensor, b: int, out_h: int, out_w: int) -> torch.Tensor:
    """The output back as an image: [b * out_h * out_w, C] -> [b, C, out_h, out_w]."""
    channels = y.shape[1]
    y = y.view(b, out_h * out_w, channels).transpose(1, 2)
    return y.reshape(b, channels, out_h, out_w)


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
