"""Per-output-channel symmetric fake quantization of a weight, fused into two passes."""

from __future__ import annotations

import torch

from lightning_compress.ops._library import register_op


def fake_quant_rows_reference(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``clamp(round(w / s), -qmax, qmax) * s`` with ``s = max|row| / qmax`` per output channel.

    Args:
        weight: float32 weight, output channels on dim 0.
        bits: 2 to 8; ``qmax = 2^(bits-1) - 1``.

    Returns:
        The fake-quantized weight and the per-channel scales (float32, shape [C]).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"fake_quant_rows: `bits` must be in [2, 8], got {bits}")
    if weight.dtype != torch.float32:
        raise TypeError(f"fake_quant_rows: `weight` must be float32, got {weight.dtype}")
    qmax = 2 ** (bits - 1) - 1
    rows = weight.reshape(weight.shape[0], -1)
    scale = (
        rows.abs().amax(dim=1).clamp_min(1e-12) / qmax
        if rows.shape[1]
        else rows.new_full((rows.shape[0],), 1e-12 / qmax)
    )
    out = torch.div(rows, scale[:, None]).round_().clamp_(-qmax, qmax).mul_(scale[:, None])
    return out.view(weight.shape), scale


def _fake_quant_rows_fake(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


fake_quant_rows = register_op(
    "fake_quant_rows(Tensor weight, int bits) -> (Tensor, Tensor)",
    fake_quant_rows_reference,
    _fake_quant_rows_fake,
)
