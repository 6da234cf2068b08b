"""Weight sharing's training step (Deep Compression) as two fused ops, one pass each.

``shared_weight_forward`` gives the weight a shared layer computes with: each non-zero weight's
centroid, ``codebook[group, index]``, and exactly 0 where the weight is 0.
``shared_weight_backward_`` gives the gradients: the weight's straight through where it is not
zero (0 at zeros, written into the incoming gradient in place), and each centroid's the sum of the
gradients of its weights. The backward compares the weight again instead of keeping a zero mask
from the forward.

Weights are read as [rows, cols] with output channels on dim 0 (any trailing shape is flattened);
``groups`` codebooks each serve ``rows // groups`` consecutive rows.
"""

from __future__ import annotations

import torch

from lightning_compress.ops._library import register_op

# Elements per chunk of the references: their temporaries (int32 indices, the zero mask) stay
# bounded by the chunk, not by the layer (the reference is the kernel of devices without one).
CHUNK = 1 << 22


def _check(op: str, weight: torch.Tensor, indices: torch.Tensor, groups: int, levels: int) -> None:
    torch._check_type(
        weight.dtype == torch.float32, lambda: f"{op}: `weight` must be float32, got {weight.dtype}"
    )
    torch._check_value(
        weight.dim() >= 1, lambda: f"{op}: `weight` needs an output-channel dimension"
    )
    torch._check_value(
        indices.dtype == torch.uint8 and indices.shape == weight.shape,
        lambda: (
            f"{op}: `indices` must be uint8 of the weight's shape {tuple(weight.shape)}, got "
            f"{indices.dtype} {tuple(indices.shape)}"
        ),
    )
    torch._check_value(
        groups >= 1 and weight.shape[0] % groups == 0,
        lambda: f"{op}: `groups`={groups} must divide the output channels ({weight.shape[0]})",
    )
    torch._check_value(
        1 <= levels <= 256, lambda: f"{op}: `levels` must be in [1, 256], got {levels}"
    )


def _check_forward(weight: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> None:
    torch._check_value(
        codebook.dtype == torch.float32 and codebook.dim() == 2,
        lambda: (
            "shared_weight_forward: `codebook` must be float32 [groups, levels], got "
            f"{codebook.dtype} {tuple(codebook.shape)}"
        ),
    )
    _check("shared_weight_forward", weight, indices, codebook.shape[0], codebook.shape[1])


def _check_backward(
    grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, groups: int, levels: int
) -> None:
    _check("shared_weight_backward_", weight, indices, groups, levels)
    torch._check_value(
        grad.dtype == torch.float32 and grad.shape == weight.shape,
        lambda: (
            f"shared_weight_backward_: `grad` must be float32 of the weight's shape "
            f"{tuple(weight.shape)}, got {grad.dtype} {tuple(grad.shape)}"
        ),
    )


def _row_chunks(rows: int, cols: int, groups: int) -> list[tuple[int, slice]]:
    """(group, rows) pairs of at most about ``CHUNK`` elements, never across two groups."""
    per_group = rows // groups
    step = max(1, min(per_group, CHUNK // max(cols, 1)))
    return [
        (g, slice(r, min(r + step, (g + 1) * per_group)))
        for g in range(groups)
        for r in range(g * per_group, (g + 1) * per_group, step)
    ]


def shared_weight_forward_any(
    weight: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor
) -> torch.Tensor:
    """:func:`shared_weight_forward_reference` without the dtype checks: any floating weight
    (the codebook is cast to its dtype), for the precisions the compiled kernel does not take."""
    rows = weight.shape[0]
    books = codebook.detach().to(weight.dtype)
    w = weight.detach().reshape(rows, -1)
    idx = indices.reshape(rows, -1)
    out = torch.empty(w.shape, dtype=weight.dtype, device=weight.device)
    for g, chunk in _row_chunks(rows, w.shape[1], books.shape[0]):
        rows_out = out[chunk]  # contiguous rows: the gather writes straight into them
        torch.index_select(
            books[g], 0, idx[chunk].reshape(-1).to(torch.int32), out=rows_out.view(-1)
        )
        rows_out.masked_fill_(w[chunk] == 0, 0)
    return out.view(weight.shape)


def shared_weight_backward_any(
    grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, groups: int, levels: int
) -> torch.Tensor:
    """:func:`shared_weight_backward_reference` without the dtype checks (any floating
    ``grad`` and ``weight``; the centroids' gradient is float32)."""
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1)
    idx = indices.reshape(rows, -1)
    work = grad if grad.is_contiguous() else grad.contiguous()
    g2 = work.view(rows, -1)
    grad_codebook = torch.zeros(groups, levels, dtype=torch.float32, device=grad.device)
    for g, chunk in _row_chunks(rows, w.shape[1], groups):
        masked = g2[chunk].masked_fill_(w[chunk] == 0, 0)
        # uint8 indices go to bincount as they are: no wider copy.
        counts = torch.bincount(
            idx[chunk].reshape(-1), weights=masked.reshape(-1).float(), minlength=levels
        )
        if counts.numel() != levels:
            raise IndexError(
                f"shared_weight_backward_: index {counts.numel() - 1} is out of range for a "
                f"codebook of {levels} entries"
            )
        grad_codebook[g] += counts.float()
    if work is not grad:
        grad.copy_(work)
    return grad_codebook


def shared_weight_forward_reference(
    weight: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor
) -> torch.Tensor:
    """``codebook[group(r), indices[r, c]]`` where ``weight[r, c] != 0``, else exactly 0.

    Args:
        weight: float32 weight, output channels on dim 0 (any trailing shape).
        indices: uint8 index of each weight's centroid, the weight's shape.
        codebook: float32 [groups, levels]; group ``g`` serves rows
            ``[g * rows // groups, (g + 1) * rows // groups)``.

    Returns:
        A new contiguous float32 tensor of the weight's shape.

    Raises:
        IndexError: An index is not below ``levels``.
    """
    _check_forward(weight, indices, codebook)
    return shared_weight_forward_any(weight, indices, codebook)


def shared_weight_backward_reference(
    grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, groups: int, levels: int
) -> torch.Tensor:
    """Zeros ``grad`` in place where ``weight == 0``; returns the centroids' gradient.

    Args:
        grad: float32 gradient of the forward's output, the weight's shape; overwritten with the
            weight's gradient (straight through where the weight is not zero, 0 where it is).
        weight: float32 weight, as given to the forward.
        indices: uint8 indices, as given to the forward.
        groups: Codebooks (rows of the codebook).
        levels: Centroids per codebook.

    Returns:
        float32 [groups, levels]: entry ``[g, l]`` is the sum of ``grad`` over the non-zero
        weights of group ``g`` with index ``l``.

    Raises:
        IndexError: An index is not below ``levels``.
    """
    _check_backward(grad, weight, indices, groups, levels)
    return shared_weight_backward_any(grad, weight, indices, groups, levels)


def _forward_fake(
    weight: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor
) -> torch.Tensor:
    _check_forward(weight, indices, codebook)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _backward_fake(
    grad: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, groups: int, levels: int
) -> torch.Tensor:
    _check_backward(grad, weight, indices, groups, levels)
    return grad.new_empty((groups, levels), dtype=torch.float32)


shared_weight_forward = register_op(
    "shared_weight_forward", shared_weight_forward_reference, _forward_fake
)
shared_weight_backward_ = register_op(
    "shared_weight_backward_", shared_weight_backward_reference, _backward_fake
)
