"""Sparse linear layers over shared weights: a codebook per group of rows, an index per non-zero.

Weight sharing (Deep Compression) keeps each non-zero weight as the index of one of ``C = 2**bits``
float32 centroids (bits 1 to 8), one codebook per group of ``group_rows`` consecutive output
rows. The op computes ``y = x @ W^T + bias`` with float32 ``x`` [B, K] and ``W[r, col[j]] =
codebook[r // group_rows, index j]`` for the non-zeros ``j`` of row ``r``: the same numbers as
the dense float model up to the order of the float sums. Given ``act_scale`` > 0 the output is
then fake-quantized as in the other linear ops.

Runtime layout (:func:`lut_layout`):

- ``row_ptr`` int64 [N + 1], ``col`` [nnz]: compressed rows as in
  :mod:`lightning_compress.ops.packed` (int16 holding uint16 columns when K <= 65536, else
  int32), the non-zeros of each row in column order.
- ``idx`` uint8: the non-zeros' indices in the same order, two per byte (low nibble the even
  non-zero of the whole stream) when ``C <= 16``, so ``ceil(nnz / 2)`` bytes; else one per byte.
- ``codebook`` float32 [ceil(N / group_rows), C].

At 4 bits and K <= 65536 that is 2.5 bytes per non-zero (int8 compressed rows: 3). The compiled
kernel looks the weights up in registers (one ``vpermps`` per 16 non-zeros with <= 16
centroids). It reads every codebook through a copy zero-padded to 16 (nibbles) or 256 (bytes)
entries, so an index past the codebook gives a 0.0 weight, never a read outside memory, and the
reference does the same; columns are trusted as by ``sparse_int_linear``. Every layout built
from outside data goes through :func:`check_lut_layout` once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_compress.ops._library import register_op
from lightning_compress.ops.packed import (
    _check_act,
    _fake_quant_output,
    column_index,
    columns_as_int64,
)

MAX_BITS = 8
NIBBLE_LEVELS = 16  # codebooks up to this size store two indices per byte


def index_bytes(nnz: int, levels: int) -> int:
    """Bytes of ``idx`` for ``nnz`` indices into a codebook of ``levels`` entries."""
    return -(-nnz // 2) if levels <= NIBBLE_LEVELS else nnz


def pack_indices(indices: torch.Tensor, levels: int) -> torch.Tensor:
    """The ``idx`` stream of 1-D indices: two per byte when ``levels`` <= 16, else one per byte."""
    flat = indices.reshape(-1).to(torch.uint8)
    if levels > NIBBLE_LEVELS:
        return flat.contiguous()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def unpack_indices(idx: torch.Tensor, nnz: int, levels: int) -> torch.Tensor:
    """int64 [nnz] indices of an ``idx`` stream (the inverse of :func:`pack_indices`)."""
    if levels > NIBBLE_LEVELS:
        return idx[:nnz].to(torch.int64)
    nibbles = torch.stack([idx & 0xF, idx >> 4], dim=1).reshape(-1)
    return nibbles[:nnz].to(torch.int64)


def _levels_ok(levels: int) -> bool:
    return 2 <= levels <= 2**MAX_BITS and levels & (levels - 1) == 0


def lut_layout(
    codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The op's tensors of a shared weight: ``(row_ptr, col, idx, codebook, group_rows)``.

    Args:
        codebook: float32 [groups, 2**bits], bits 1 to 8; ``groups`` divides N and each group of
            ``N // groups`` consecutive rows has its own centroids.
        indices: uint8 [N, K], each weight's centroid (read where ``mask`` is set).
        mask: bool [N, K], the weights that are not exact zeros.

    Returns:
        The layout of the module doc, ready for ``lut_sparse_linear(x, *layout, bias, K)``.

    Raises:
        TypeError: Wrong dtypes or ranks.
        ValueError: A codebook whose size is not a power of two in [2, 256] or whose groups do
            not divide N, a mask of another shape, or indices past the codebook.
    """
    if codebook.dtype != torch.float32 or codebook.dim() != 2:
        raise TypeError(
            f"lut_layout: `codebook` must be 2-D float32, got {codebook.dtype} "
            f"{tuple(codebook.shape)}"
        )
    if indices.dtype != torch.uint8 or indices.dim() != 2:
        raise TypeError(
            f"lut_layout: `indices` must be 2-D uint8, got {indices.dtype} {tuple(indices.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != indices.shape:
        raise TypeError(
            f"lut_layout: `mask` must be bool {tuple(indices.shape)}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    n, k = indices.shape
    groups, levels = codebook.shape
    if not _levels_ok(levels):
        raise ValueError(
            f"lut_layout: the codebook must have 2**bits entries, bits 1 to {MAX_BITS}, "
            f"got {levels}"
        )
    if not 1 <= groups <= max(n, 1) or n % groups:
        raise ValueError(f"lut_layout: the codebook's {groups} groups must divide the {n} rows")
    rows, cols = mask.nonzero(as_tuple=True)
    picked = indices[rows, cols]
    if picked.numel() and int(picked.max()) >= levels:
        raise ValueError(
            f"lut_layout: indices point past the codebook's {levels} entries "
            f"(largest {int(picked.max())})"
        )
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    idx = pack_indices(picked, levels)
    return row_ptr, column_index(cols, k), idx, codebook.contiguous(), max(n // groups, 1)


def check_lut_layout(
    row_ptr: torch.Tensor,
    col: torch.Tensor,
    idx: torch.Tensor,
    codebook: torch.Tensor,
    group_rows: int,
    shape: tuple[int, int],
) -> None:
    """Raises ValueError unless the layout is well formed for a weight of ``shape``.

    Checks what the kernel trusts or merely survives: row_ptr running from 0 to nnz without
    decreasing, columns inside the weight, indices inside the codebook, and every tensor's
    dtype and size.
    """
    n, k = shape
    if row_ptr.dtype != torch.int64 or row_ptr.shape != (n + 1,):
        raise ValueError(
            f"row_ptr must be int64 [{n + 1}], got {row_ptr.dtype} {tuple(row_ptr.shape)}"
        )
    want = torch.int16 if k <= 65536 else torch.int32
    if col.dtype != want or col.dim() != 1:
        raise ValueError(f"col must be 1-D {want}, got {col.dtype} {tuple(col.shape)}")
    nnz = col.numel()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz:
        raise ValueError(f"row_ptr must run from 0 to the number of non-zeros ({nnz})")
    if bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError("row_ptr must not decrease")
    cols = columns_as_int64(col)
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= k):
        raise ValueError(f"column index out of range [0, {k})")
    if group_rows < 1:
        raise ValueError(f"group_rows must be >= 1, got {group_rows}")
    groups = -(-n // group_rows)
    if codebook.dtype != torch.float32 or codebook.dim() != 2 or codebook.shape[0] != groups:
        raise ValueError(
            f"codebook must be float32 [{groups}, 2**bits], got {codebook.dtype} "
            f"{tuple(codebook.shape)}"
        )
    levels = codebook.shape[1]
    if not _levels_ok(levels):
        raise ValueError(f"codebook must have 2**bits entries, bits 1 to {MAX_BITS}, got {levels}")
    width = index_bytes(nnz, levels)
    if idx.dtype != torch.uint8 or idx.shape != (width,):
        raise ValueError(
            f"idx must be uint8 [{width}] for {nnz} non-zeros, got {idx.dtype} {tuple(idx.shape)}"
        )
    index = unpack_indices(idx, nnz, levels)
    if nnz and int(index.max()) >= levels:
        raise ValueError(
            f"indices point past the codebook's {levels} entries (largest {int(index.max())})"
        )


def dense_from_lut(
    row_ptr: torch.Tensor,
    col: torch.Tensor,
    idx: torch.Tensor,
    codebook: torch.Tensor,
    group_rows: int,
    shape: tuple[int, int],
) -> torch.Tensor:
    """The float32 weight [N, K] a layout holds (an index past the codebook reads 0.0, as in the
    compiled kernel)."""
    n = shape[0]
    levels = codebook.shape[1]
    padded = F.pad(codebook, (0, (NIBBLE_LEVELS if levels <= NIBBLE_LEVELS else 256) - levels))
    nnz = col.numel()
    rows = torch.repeat_interleave(torch.arange(n, device=row_ptr.device), row_ptr.diff())
    index = unpack_indices(idx, nnz, levels)
    dense = torch.zeros(shape, dtype=torch.float32, device=codebook.device)
    dense[rows, columns_as_int64(col)] = padded[rows // group_rows, index]
    return dense


def _check(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col: torch.Tensor,
    idx: torch.Tensor,
    codebook: torch.Tensor,
    group_rows: int,
    bias: torch.Tensor | None,
    in_features: int,
    *act: float,
) -> int:
    """The compiled kernel's preconditions that do not read the layout's data; returns N."""
    op = "lut_sparse_linear"
    _check_act(op, *act)
    torch._check_type(
        x.dtype == torch.float32 and x.dim() == 2,
        lambda: f"{op}: `x` must be 2-D float32 [batch, in_features], got {x.dtype} {x.dim()}-D",
    )
    torch._check_value(
        x.shape[1] == in_features,
        lambda: f"{op}: `x` has {x.shape[1]} features, the layer {in_features}",
    )
    torch._check_value(
        row_ptr.dtype == torch.int64 and row_ptr.dim() == 1 and row_ptr.numel() >= 1,
        lambda: f"{op}: `row_ptr` must be 1-D int64 with N+1 entries",
    )
    n = row_ptr.shape[0] - 1
    torch._check_value(
        group_rows >= 1, lambda: f"{op}: `group_rows` must be >= 1, got {group_rows}"
    )
    groups = -(-n // max(group_rows, 1))
    torch._check_value(
        codebook.dtype == torch.float32
        and codebook.dim() == 2
        and codebook.shape[0] == groups
        and _levels_ok(codebook.shape[1]),
        lambda: (
            f"{op}: `codebook` must be float32 [{groups}, 2^bits] (bits 1..8), got "
            f"{codebook.dtype} {tuple(codebook.shape)}"
        ),
    )
    torch._check_type(
        col.dim() == 1 and col.dtype in (torch.int16, torch.int32),
        lambda: f"{op}: `col` must be 1-D int16 (read as uint16) or int32, got {col.dtype}",
    )
    torch._check_value(
        col.dtype != torch.int16 or in_features <= 65536,
        lambda: f"{op}: int16 columns need in_features <= 65536",
    )
    width = index_bytes(col.numel(), codebook.shape[1])
    torch._check_value(
        idx.dtype == torch.uint8 and idx.dim() == 1 and idx.numel() == width,
        lambda: (
            f"{op}: `idx` must be 1-D uint8 with {width} entries ({col.numel()} non-zeros), "
            f"got {idx.dtype} {tuple(idx.shape)}"
        ),
    )
    torch._check_value(
        bias is None or (bias.dtype == torch.float32 and bias.shape == (n,)),
        lambda: (
            f"{op}: `bias` must be float32 of shape [{n}], got {bias.dtype} {tuple(bias.shape)}"
        ),
    )
    return n


def lut_sparse_linear_reference(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col: torch.Tensor,
    idx: torch.Tensor,
    codebook: torch.Tensor,
    group_rows: int,
    bias: torch.Tensor | None,
    in_features: int,
    act_scale: float = 0.0,
    act_zero_point: int = 0,
    act_qmax: int = 255,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a shared weight in compressed rows (see the module doc), the output
    fake-quantized per tensor (``act_scale``, ``act_zero_point``, range [0, ``act_qmax``]) when
    ``act_scale`` > 0."""
    act = (act_scale, act_zero_point, act_qmax)
    n = _check(x, row_ptr, col, idx, codebook, group_rows, bias, in_features, *act)
    weight = dense_from_lut(
        row_ptr.cpu(), col.cpu(), idx.cpu(), codebook.cpu(), group_rows, (n, in_features)
    )
    return _fake_quant_output(F.linear(x, weight.to(x.device), bias), *act)


# The dispatcher leaves out trailing arguments that have their default value.
def _lut_fake(x: torch.Tensor, *args: Any) -> torch.Tensor:
    n = _check(x, *args)
    return x.new_empty((x.shape[0], n))


lut_sparse_linear = register_op("lut_sparse_linear", lut_sparse_linear_reference, _lut_fake)
