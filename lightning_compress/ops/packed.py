"""Linear layers over packed integer weights: dense int8/int4 and compressed sparse rows of int8.

Both ops compute ``y = (x @ q^T) * scale + bias`` with float32 activations ``x`` [B, K], integer
weights ``q`` [N, K] and one float32 scale per output channel; given ``act_scale`` > 0, the output
is then fake-quantized per tensor (8-bit activations of a QAT-trained layer) in the same pass.
Weights stay integer in memory; the compiled kernels widen them to fp32 in registers.

Runtime layouts:

- dense: int8 [N, K], or for 4 bits uint8 [N, ceil(K / 2)], two columns per byte (low nibble the
  even column), values in [-8, 7].
- sparse (:func:`sparse_layout`): ``row_ptr`` int64 [N + 1], ``col`` [nnz] (int16 holding uint16
  columns when K <= 65536, else int32), ``values`` int8 [nnz]. Only non-zero integers are kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_compress.ops._library import register_op

NARROW_COLUMNS = 65536  # int16 (read as uint16) column indices up to this many inputs


def unpack_rows_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int8 [N, K] from the row-packed 4-bit layout uint8 [N, ceil(K / 2)]."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    nibbles = nibbles[:, :in_features].to(torch.int16)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def pack_rows_int4(q: torch.Tensor) -> torch.Tensor:
    """Row-packed 4-bit layout (uint8 [N, ceil(K / 2)]) of int8 [N, K] values in [-8, 7]."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_rows_int4: need 2-D int8, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_rows_int4: values must lie in [-8, 7]")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if q.shape[1] % 2:
        nib = torch.cat([nib, nib.new_zeros(q.shape[0], 1)], dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def sparse_layout(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compressed rows of an int8 weight [N, K]: ``(row_ptr, col, values)``, zeros dropped."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"sparse_layout: need 2-D int8, got {q.dtype} {tuple(q.shape)}")
    rows, cols = (q != 0).nonzero(as_tuple=True)
    row_ptr = torch.zeros(q.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=q.shape[0]).cumsum(0)
    return row_ptr, column_index(cols, q.shape[1]), q[rows, cols].contiguous()


def column_index(cols: torch.Tensor, in_features: int) -> torch.Tensor:
    """Column indices in the kernels' width: int16 holding uint16 below 65536 inputs, else int32."""
    if in_features <= NARROW_COLUMNS:
        return cols.to(torch.int32).to(torch.uint16).view(torch.int16).contiguous()
    return cols.to(torch.int32).contiguous()


def columns_as_int64(col: torch.Tensor) -> torch.Tensor:
    """Column indices of either width as int64."""
    if col.dtype == torch.int16:
        return col.view(torch.uint16).to(torch.int64)
    return col.to(torch.int64)


def check_sparse_layout(
    row_ptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> None:
    """Raises ValueError unless the layout is well formed for a weight of ``shape``.

    The kernel trusts column indices (checking them per call would cost a pass over the weight),
    so every layout built from outside data goes through this once.
    """
    n, k = shape
    if row_ptr.dtype != torch.int64 or row_ptr.shape != (n + 1,):
        raise ValueError(
            f"row_ptr must be int64 [{n + 1}], got {row_ptr.dtype} {tuple(row_ptr.shape)}"
        )
    if values.dtype != torch.int8 or values.dim() != 1:
        raise ValueError(f"values must be 1-D int8, got {values.dtype} {tuple(values.shape)}")
    want = torch.int16 if k <= NARROW_COLUMNS else torch.int32
    if col.dtype != want or col.shape != values.shape:
        raise ValueError(f"col must be {want} of shape {tuple(values.shape)}")
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != values.numel():
        raise ValueError("row_ptr must run from 0 to the number of values")
    if bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError("row_ptr must not decrease")
    cols = columns_as_int64(col)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= k):
        raise ValueError(f"column index out of range [0, {k})")


def dense_from_sparse(
    row_ptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The int8 weight [N, K] a sparse layout holds."""
    rows = torch.repeat_interleave(torch.arange(shape[0]), row_ptr.diff())
    dense = torch.zeros(shape, dtype=torch.int8)
    dense[rows, columns_as_int64(col)] = values
    return dense


def _check_act(
    op: str, act_scale: float = 0.0, act_zero_point: int = 0, act_qmax: int = 255
) -> None:
    torch._check_value(
        act_scale >= 0,
        lambda: f"{op}: `act_scale` must be >= 0 (0: float outputs), got {act_scale}",
    )
    torch._check_value(
        act_scale == 0 or (act_qmax > 0 and 0 <= act_zero_point <= act_qmax),
        lambda: f"{op}: activation zero point {act_zero_point} must lie in [0, {act_qmax}]",
    )


def _check_linear(
    op: str, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, n: int
) -> None:
    torch._check_type(x.dtype == torch.float32, lambda: f"{op}: `x` must be float32, got {x.dtype}")
    torch._check_value(
        x.dim() == 2, lambda: f"{op}: `x` must be 2-D [batch, in_features], got {x.dim()}-D"
    )
    for arg, t in (("scale", scale), ("bias", bias)):
        torch._check_value(
            t is None or (t.dtype == torch.float32 and t.shape == (n,)),
            lambda arg=arg, t=t: (
                f"{op}: `{arg}` must be float32 of shape [{n}], got {t.dtype} {tuple(t.shape)}"
            ),
        )


def _check_sparse(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    *act: float,
) -> None:
    """The compiled kernel's preconditions that do not read the layout's data."""
    op = "sparse_int_linear"
    _check_act(op, *act)
    torch._check_value(
        row_ptr.dtype == torch.int64 and row_ptr.dim() == 1 and row_ptr.numel() >= 1,
        lambda: f"{op}: `row_ptr` must be 1-D int64 with N+1 entries",
    )
    _check_linear(op, x, scale, bias, row_ptr.shape[0] - 1)
    torch._check_value(
        x.shape[1] == in_features,
        lambda: f"{op}: `x` has {x.shape[1]} features, the layer {in_features}",
    )
    torch._check_type(
        values.dtype == torch.int8 and values.dim() == 1,
        lambda: f"{op}: `values` must be 1-D int8, got {values.dtype}",
    )
    torch._check_value(
        col.dim() == 1 and col.numel() == values.numel(),
        lambda: f"{op}: `col` must be 1-D with one entry per value",
    )
    torch._check_type(
        col.dtype in (torch.int16, torch.int32),
        lambda: f"{op}: `col` must be int16 (read as uint16) or int32, got {col.dtype}",
    )
    torch._check_value(
        col.dtype != torch.int16 or in_features <= NARROW_COLUMNS,
        lambda: f"{op}: int16 columns need in_features <= {NARROW_COLUMNS}",
    )


def _check_dense(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    *act: float,
) -> None:
    op = "int_linear"
    _check_act(op, *act)
    torch._check_value(bits in (4, 8), lambda: f"{op}: `bits` must be 8 or 4, got {bits}")
    torch._check_value(
        qweight.dim() == 2, lambda: f"{op}: `qweight` must be 2-D, got {qweight.dim()}-D"
    )
    _check_linear(op, x, scale, bias, qweight.shape[0])
    k = x.shape[1]
    dtype, width = (torch.int8, k) if bits == 8 else (torch.uint8, (k + 1) // 2)
    torch._check_value(
        qweight.dtype == dtype and qweight.shape[1] == width,
        lambda: (
            f"{op}: {bits}-bit `qweight` must be {dtype} [N, {width}], got {qweight.dtype} "
            f"{tuple(qweight.shape)}"
        ),
    )


def sparse_int_linear_reference(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> torch.Tensor:
    """``x @ (q * scale[:, None])^T + bias`` for a weight in compressed rows (see module doc),
    fake-quantized per tensor (``act_scale``, ``act_zero_point``, range [0, ``act_qmax``]) when
    ``act_scale`` > 0."""
    _check_sparse(
        x, row_ptr, col, values, scale, bias, in_features, act_scale, act_zero_point, act_qmax
    )
    weight = dense_from_sparse(row_ptr.cpu(), col.cpu(), values.cpu(), (scale.numel(), in_features))
    weight = weight.to(x.device).float() * scale[:, None]
    return _fake_quant_output(F.linear(x, weight, bias), act_scale, act_zero_point, act_qmax)


def _fake_quant_output(y: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    if scale == 0:
        return y
    return torch.fake_quantize_per_tensor_affine(y, scale, zero_point, 0, qmax)


def int_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> torch.Tensor:
    """``x @ (q * scale[:, None])^T + bias`` for a dense int8, or row-packed int4, weight; the
    output fake-quantized as in :func:`sparse_int_linear_reference` when ``act_scale`` > 0."""
    _check_dense(x, qweight, scale, bias, bits, act_scale, act_zero_point, act_qmax)
    q = qweight if bits == 8 else unpack_rows_int4(qweight, x.shape[1])
    y = F.linear(x, q.float() * scale[:, None], bias)
    return _fake_quant_output(y, act_scale, act_zero_point, act_qmax)


# The dispatcher leaves out trailing arguments that have their default value.
def _sparse_fake(x: torch.Tensor, row_ptr: torch.Tensor, *args: Any) -> torch.Tensor:
    _check_sparse(x, row_ptr, *args)
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))


def _int_fake(x: torch.Tensor, qweight: torch.Tensor, *args: Any) -> torch.Tensor:
    _check_dense(x, qweight, *args)
    return x.new_empty((x.shape[0], qweight.shape[0]))


sparse_int_linear = register_op("sparse_int_linear", sparse_int_linear_reference, _sparse_fake)
int_linear = register_op("int_linear", int_linear_reference, _int_fake)


def hugepage_copy_reference(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` (the compiled kernel puts copies of 2 MiB and more in huge
    pages, which spares the kernels a TLB miss per 4 KiB of streamed weight)."""
    return t.contiguous().clone()


def _hugepage_copy_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


hugepage_copy = register_op("hugepage_copy", hugepage_copy_reference, _hugepage_copy_fake)
