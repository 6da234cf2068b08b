"""Sparse int8 linear layers with dynamically quantized activations (int8 x int8 products).

Both ops compute ``y = (q_x - z_x) @ q^T * s_x * scale + bias`` where ``q`` [N, K] are the
layer's int8 weights with one fp32 ``scale`` per output channel, and each row ``b`` of ``x`` is
quantized on the fly (:func:`quantize_rows`): uint8 ``q_x`` with its own step ``s_x[b]`` and
zero point ``z_x[b]``, over the row's range widened to hold 0 (so zero is exact and a ReLU
output keeps all 256 levels). The integer products are exact; what differs from the fp32
activation kernels (:mod:`lightning_compress.ops.packed`) is the input's rounding, at most half
a step per element, as in torch's and ONNX Runtime's dynamic quantization, whose per-tensor step
is never finer than this per-row one. Given ``act_scale`` > 0 the output is fake-quantized as
in the other linear ops.

Runtime layouts (weights with at most 65536 inputs, so every int32 sum is exact):

- bitmask (:func:`bitmask_layout`): ``row_ptr`` int64 [N + 1] into ``values``, ``mask`` int64
  [N, ceil(K / 64)] (bit i of word w: column 64 w + i is non-zero), ``values`` int8 [nnz] in
  column order. 1 bit per weight plus 1 byte per non-zero: at 90% sparsity 2.25 bytes per
  non-zero, the layout a batch-1 product streams.
- block (:func:`block_layout`): the non-empty groups of 4 columns of each row: ``row_ptr``
  int64 [N + 1] into the groups, ``group`` int16 [blocks] (the group's first column / 4),
  ``values`` int8 [4 * blocks] (zeros inside a group kept). One VNNI instruction multiplies a
  group with 16 rows of x: the layout for batches.

Both carry ``row_sum`` int32 [N], each row's sum of integers (the zero-point correction). The
kernels trust what the builders produced (checking masks or groups per call would cost a pass
over the weight); every layout built from outside data goes through a builder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_compress.ops._library import register_op
from lightning_compress.ops.packed import _check_act, _fake_quant_output

MAX_IN_FEATURES = 65536
WORD = 64
GROUP = 4


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of float32 ``x`` [B, K] as uint8 ``(q, step, zero_point)``: ``x ~ step (q - zp)``.

    The row's range [min(x, 0), max(x, 0)] is split into 255 steps (step 1 for an all-zero
    row); ``zp = round(-min / step)``, ``q = clamp(round(x / step) + zp, 0, 255)``, rounding half
    to even, in float32 as the compiled kernels compute it.
    """
    lo = x.amin(dim=1).clamp(max=0) if x.shape[1] else x.new_zeros(x.shape[0])
    hi = x.amax(dim=1).clamp(min=0) if x.shape[1] else x.new_zeros(x.shape[0])
    step = (hi - lo) / 255.0
    step = torch.where(step > 0, step, torch.ones_like(step))
    inv = 1.0 / step
    zero = torch.round(-lo * inv).clamp(0, 255)
    q = (torch.round(x * inv[:, None]) + zero[:, None]).clamp(0, 255)
    return q.to(torch.uint8), step, zero.to(torch.int32)


def _row_sum(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.int32).sum(dim=1, dtype=torch.int32)


def _check_builder(q: torch.Tensor, what: str) -> None:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"{what}: need 2-D int8, got {q.dtype} {tuple(q.shape)}")
    if not 1 <= q.shape[1] <= MAX_IN_FEATURES:
        raise ValueError(f"{what}: in_features must be in [1, {MAX_IN_FEATURES}], got {q.shape[1]}")


def bitmask_layout(
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_ptr, mask, values, row_sum)`` of an int8 weight [N, K] (see the module doc)."""
    _check_builder(q, "bitmask_layout")
    n, k = q.shape
    words = -(-k // WORD)
    nonzero = F.pad(q != 0, (0, words * WORD - k)).view(n, words, WORD)
    weights = torch.ones(WORD, dtype=torch.int64) << torch.arange(WORD, dtype=torch.int64)
    # Distinct powers of two: their int64 sum is the bit pattern (bit 63 wraps to the sign).
    mask = (nonzero.to(torch.int64) * weights).sum(dim=2)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = (q != 0).sum(dim=1).cumsum(0)
    return row_ptr, mask.contiguous(), q[q != 0].contiguous(), _row_sum(q)


def block_layout(
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_ptr, group, values, row_sum)`` of an int8 weight [N, K] (see the module doc)."""
    _check_builder(q, "block_layout")
    n, k = q.shape
    groups = -(-k // GROUP)
    grouped = F.pad(q, (0, groups * GROUP - k)).view(n, groups, GROUP)
    rows, cols = (grouped != 0).any(dim=2).nonzero(as_tuple=True)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    group = cols.to(torch.int16).contiguous()  # < 16384: in_features <= 65536
    return row_ptr, group, grouped[rows, cols].reshape(-1).contiguous(), _row_sum(q)


def dense_from_bitmask(
    row_ptr: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, in_features: int
) -> torch.Tensor:
    """The int8 weight [N, K] a bitmask layout holds."""
    n, words = mask.shape
    bits = (mask[:, :, None] >> torch.arange(WORD, dtype=torch.int64)) & 1
    nonzero = bits.bool().reshape(n, words * WORD)[:, :in_features]
    dense = torch.zeros(n, in_features, dtype=torch.int8)
    dense[nonzero] = values[: int(nonzero.sum())]
    return dense


def dense_from_blocks(
    row_ptr: torch.Tensor, group: torch.Tensor, values: torch.Tensor, in_features: int
) -> torch.Tensor:
    """The int8 weight [N, K] a block layout holds."""
    n = row_ptr.numel() - 1
    groups = -(-in_features // GROUP)
    rows = torch.repeat_interleave(torch.arange(n), row_ptr.diff())
    dense = torch.zeros(n, groups, GROUP, dtype=torch.int8)
    dense[rows, group.to(torch.int64)] = values.view(-1, GROUP)
    return dense.reshape(n, groups * GROUP)[:, :in_features]


def check_bitmask_layout(
    row_ptr: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> None:
    """Raises ValueError unless a bitmask layout is well formed for a weight of ``shape``."""
    n, k = shape
    _check_row_ptr(row_ptr, n, values.numel())
    words = -(-k // WORD)
    if mask.dtype != torch.int64 or mask.shape != (n, words):
        raise ValueError(f"mask must be int64 [{n}, {words}], got {mask.dtype} {tuple(mask.shape)}")
    bits = ((mask[:, :, None] >> torch.arange(WORD, dtype=torch.int64)) & 1).reshape(n, -1)
    if bool(bits[:, k:].any()):
        raise ValueError(f"mask has bits past column {k}")
    if not torch.equal(bits.sum(dim=1), row_ptr.diff()):
        raise ValueError("mask and row_ptr disagree on the number of values per row")


def check_block_layout(
    row_ptr: torch.Tensor, group: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> None:
    """Raises ValueError unless a block layout is well formed for a weight of ``shape``."""
    n, k = shape
    _check_row_ptr(row_ptr, n, group.numel())
    if group.dtype != torch.int16 or group.dim() != 1 or values.numel() != GROUP * group.numel():
        raise ValueError("group must be 1-D int16 with one entry per 4 values")
    groups = -(-k // GROUP)
    if group.numel() and (int(group.min()) < 0 or int(group.max()) >= groups):
        raise ValueError(f"group index out of range [0, {groups})")


def _check_row_ptr(row_ptr: torch.Tensor, n: int, total: int) -> None:
    if row_ptr.dtype != torch.int64 or row_ptr.shape != (n + 1,):
        raise ValueError(
            f"row_ptr must be int64 [{n + 1}], got {row_ptr.dtype} {tuple(row_ptr.shape)}"
        )
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != total or bool((row_ptr.diff() < 0).any()):
        raise ValueError(f"row_ptr must run from 0 to {total} without decreasing")


def _check(
    op: str,
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    values: torch.Tensor,
    row_sum: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> int:
    """The compiled kernels' preconditions that do not read the layout's data; returns N."""
    _check_act(op, act_scale, act_zero_point, act_qmax)
    torch._check_type(
        x.dtype == torch.float32 and x.dim() == 2,
        lambda: f"{op}: `x` must be 2-D float32 [batch, in_features], got {x.dtype} {x.dim()}-D",
    )
    torch._check_value(
        x.shape[1] == in_features,
        lambda: f"{op}: `x` has {x.shape[1]} features, the layer {in_features}",
    )
    torch._check_value(
        1 <= in_features <= MAX_IN_FEATURES,
        lambda: f"{op}: `in_features` must be in [1, {MAX_IN_FEATURES}], got {in_features}",
    )
    torch._check_value(
        row_ptr.dtype == torch.int64 and row_ptr.dim() == 1 and row_ptr.numel() >= 1,
        lambda: f"{op}: `row_ptr` must be 1-D int64 with N+1 entries",
    )
    n = row_ptr.shape[0] - 1
    torch._check_type(
        values.dtype == torch.int8 and values.dim() == 1,
        lambda: f"{op}: `values` must be 1-D int8, got {values.dtype}",
    )
    for arg, t, dtype in (
        ("row_sum", row_sum, torch.int32),
        ("scale", scale, torch.float32),
        ("bias", bias, torch.float32),
    ):
        torch._check_value(
            t is None or (t.dtype == dtype and t.shape == (n,)),
            lambda arg=arg, t=t, dtype=dtype: (
                f"{op}: `{arg}` must be {dtype} of shape [{n}], got {t.dtype} {tuple(t.shape)}"
            ),
        )
    return n


def dyn_linear_from_dense(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> torch.Tensor:
    """What both ops compute, from the dense int8 weight ``q`` [N, K]: x quantized per row,
    exact integer products (int64), then ``float(dot) * step * scale + bias``."""
    qx, step, zero = quantize_rows(x)
    wt = q.to(x.device, torch.int64)
    dot = (qx.to(torch.int64) - zero[:, None].to(torch.int64)) @ wt.T
    y = (dot.to(torch.float32) * step[:, None]) * scale[None, :]
    if bias is not None:
        y = y + bias
    return _fake_quant_output(y, act_scale, act_zero_point, act_qmax)


def bitmask_dyn_linear_reference(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    row_sum: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> torch.Tensor:
    """The bitmask layout's product (module doc), output fake-quantized when ``act_scale`` > 0."""
    act = (act_scale, act_zero_point, act_qmax)
    _check("bitmask_dyn_linear", x, row_ptr, values, row_sum, scale, bias, in_features, *act)
    q = dense_from_bitmask(row_ptr.cpu(), mask.cpu(), values.cpu(), in_features)
    return dyn_linear_from_dense(x, q, scale, bias, *act)


def block_dyn_linear_reference(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    group: torch.Tensor,
    values: torch.Tensor,
    row_sum: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> torch.Tensor:
    """The block layout's product (module doc), output fake-quantized when ``act_scale`` > 0."""
    act = (act_scale, act_zero_point, act_qmax)
    _check("block_dyn_linear", x, row_ptr, values, row_sum, scale, bias, in_features, *act)
    q = dense_from_blocks(row_ptr.cpu(), group.cpu(), values.cpu(), in_features)
    return dyn_linear_from_dense(x, q, scale, bias, *act)


# The dispatcher leaves out trailing arguments that have their default value.
def _bitmask_fake(x: torch.Tensor, row_ptr: torch.Tensor, mask: torch.Tensor, *args: Any):
    n = _check("bitmask_dyn_linear", x, row_ptr, *args)
    return x.new_empty((x.shape[0], n))


def _block_fake(x: torch.Tensor, row_ptr: torch.Tensor, group: torch.Tensor, *args: Any):
    n = _check("block_dyn_linear", x, row_ptr, *args)
    return x.new_empty((x.shape[0], n))


bitmask_dyn_linear = register_op("bitmask_dyn_linear", bitmask_dyn_linear_reference, _bitmask_fake)
block_dyn_linear = register_op("block_dyn_linear", block_dyn_linear_reference, _block_fake)
