"""Per-output-channel symmetric fake quantization of a weight, fused into two passes."""

from __future__ import annotations

import torch

from lightning_compress.ops._library import register_op


def _check_weight(weight: torch.Tensor, bits: int) -> None:
    torch._check_value(
        2 <= bits <= 8, lambda: f"fake_quant_rows: `bits` must be in [2, 8], got {bits}"
    )
    torch._check_type(
        weight.dtype == torch.float32,
        lambda: f"fake_quant_rows: `weight` must be float32, got {weight.dtype}",
    )
    torch._check_value(
        weight.dim() >= 1, lambda: "fake_quant_rows: `weight` needs an output-channel dimension"
    )


def fake_quant_rows_reference(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``clamp(round(w / s), -qmax, qmax) * s`` with ``s = max|row| / qmax`` per output channel.

    Args:
        weight: float32 weight, output channels on dim 0.
        bits: 2 to 8; ``qmax = 2^(bits-1) - 1``.

    Returns:
        The fake-quantized weight and the per-channel scales (float32, shape [C]).
    """
    _check_weight(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    # Contiguous, as the compiled kernel's outputs are whatever the input's strides.
    rows = weight.contiguous().view(weight.shape[0], -1)
    scale = (
        rows.abs().amax(dim=1).clamp_min(1e-12) / qmax
        if rows.shape[1]
        else rows.new_full((rows.shape[0],), 1e-12 / qmax)
    )
    out = torch.div(rows, scale[:, None]).round_().clamp_(-qmax, qmax).mul_(scale[:, None])
    return out.view(weight.shape), scale


def _fake_quant_rows_fake(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(weight, bits)
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return out, weight.new_empty((weight.shape[0],))


fake_quant_rows = register_op("fake_quant_rows", fake_quant_rows_reference, _fake_quant_rows_fake)
