"""FlipOut's per-step work as in-place ops: sign-flip counting, masked gradient noise."""

from __future__ import annotations

import math

import torch

from lightning_compress.ops._library import register_op


def _check_flip_count(param: torch.Tensor, sign: torch.Tensor, flips: torch.Tensor) -> None:
    torch._check_type(
        sign.dtype == torch.int8 and flips.dtype == torch.int32,
        lambda: (
            f"flip_count_: `sign` must be int8 and `flips` int32, got {sign.dtype}, {flips.dtype}"
        ),
    )
    torch._check_value(
        param.shape == sign.shape == flips.shape,
        lambda: "flip_count_: `param`, `sign` and `flips` must have the same shape",
    )


def flip_count_reference(param: torch.Tensor, sign: torch.Tensor, flips: torch.Tensor) -> None:
    """Adds 1 to ``flips`` where ``param``'s sign strictly changed from ``sign``, then stores it.

    Args:
        param: The weights after an optimizer step (floating point).
        sign: int8 signs (-1, 0, +1) of the weights before the step; overwritten in place.
        flips: int32 counts, same shape; incremented in place. Zeros never count as flips.
    """
    _check_flip_count(param, sign, flips)
    now = torch.sign(param.detach()).to(torch.int8)
    flips.add_((now.to(torch.int32) * sign.to(torch.int32)) < 0)
    sign.copy_(now)


def _flip_count_fake(param: torch.Tensor, sign: torch.Tensor, flips: torch.Tensor) -> None:
    _check_flip_count(param, sign, flips)


flip_count_ = register_op("flip_count_", flip_count_reference, _flip_count_fake)


BLOCK = 32768  # the norm is summed in blocks of this many elements, in order


def _check_masked_noise(grad: torch.Tensor, keep: torch.Tensor | None, noise: torch.Tensor) -> None:
    torch._check_value(
        noise.shape == grad.shape and noise.dtype == grad.dtype,
        lambda: "masked_noise_: `noise` must match `grad` in shape and dtype",
    )
    torch._check_value(
        keep is None or (keep.shape == grad.shape and keep.dtype == grad.dtype),
        lambda: "masked_noise_: `keep` must match `grad` in shape and dtype",
    )


def masked_noise_reference(
    grad: torch.Tensor, keep: torch.Tensor | None, noise: torch.Tensor, lam: float
) -> None:
    """``grad *= keep``, then ``grad += lam * ||grad||_2 / sqrt(n) * noise * keep``, in place.

    Args:
        grad: Contiguous gradient, modified in place.
        keep: 0/1 mask in ``grad``'s dtype, or None (nothing pruned).
        noise: Standard normal numbers, ``grad``'s shape and dtype.
        lam: Noise scale relative to the gradient's RMS.
    """
    _check_masked_noise(grad, keep, noise)
    if grad.numel() == 0:
        return
    if keep is not None:
        grad.mul_(keep)
    flat = grad.reshape(-1).double()
    sumsq = sum(float(flat[i : i + BLOCK].square().sum()) for i in range(0, flat.numel(), BLOCK))
    scale = lam * math.sqrt(sumsq) / math.sqrt(grad.numel())
    if scale == 0.0:
        return
    if keep is not None:
        grad.addcmul_(noise, keep, value=scale)
    else:
        grad.add_(noise, alpha=scale)


def _masked_noise_fake(
    grad: torch.Tensor, keep: torch.Tensor | None, noise: torch.Tensor, lam: float
) -> None:
    _check_masked_noise(grad, keep, noise)


masked_noise_ = register_op("masked_noise_", masked_noise_reference, _masked_noise_fake)
