"""Boolean masks packed eight to a byte (least significant bit first)."""

from __future__ import annotations

import torch

from lightning_compress.ops._library import register_op

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def _check_mask(mask: torch.Tensor) -> None:
    torch._check_type(
        mask.dtype == torch.bool, lambda: f"pack_bits: `mask` must be bool, got {mask.dtype}"
    )


def _check_packed(packed: torch.Tensor, numel: int) -> None:
    torch._check_type(
        packed.dtype == torch.uint8 and packed.dim() == 1,
        lambda: f"unpack_bits: `packed` must be 1-D uint8, got {packed.dtype}",
    )
    torch._check_value(
        numel >= 0 and (numel + 7) // 8 == packed.numel(),
        lambda: (
            f"unpack_bits: `numel`={numel} needs {(numel + 7) // 8} bytes, got {packed.numel()}"
        ),
    )


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    """Packs a bool tensor (any shape, flattened in C order) into ``ceil(n / 8)`` uint8 bytes."""
    _check_mask(mask)
    flat = mask.reshape(-1)
    n = flat.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int32, device=mask.device)
    padded[:n] = flat.to(torch.int32)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits_reference(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits_reference`: the first ``numel`` bits as a 1-D bool tensor."""
    _check_packed(packed, numel)
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.to(torch.int32).unsqueeze(1) & weights) != 0
    return bits.reshape(-1)[:numel].clone()


def _pack_bits_fake(mask: torch.Tensor) -> torch.Tensor:
    _check_mask(mask)
    return mask.new_empty(((mask.numel() + 7) // 8,), dtype=torch.uint8)


def _unpack_bits_fake(packed: torch.Tensor, numel: int) -> torch.Tensor:
    _check_packed(packed, numel)
    return packed.new_empty((numel,), dtype=torch.bool)


pack_bits = register_op("pack_bits", pack_bits_reference, _pack_bits_fake)
unpack_bits = register_op("unpack_bits", unpack_bits_reference, _unpack_bits_fake)
