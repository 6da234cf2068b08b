"""Fake quantization (Jacob et al. 2018) of weights and activations, and integer conversion.

Weights: per-output-channel, symmetric, zero-point 0, integers in [-(2^(b-1) - 1), 2^(b-1) - 1],
so 0 (a pruned weight) is exactly representable and quantizes to exactly 0. The scale of a
channel is its largest surviving magnitude over the largest integer. Activations: per-tensor,
asymmetric, 8 bits, from min/max observers (widened at once, narrowed by a moving average)
whose range contains 0.
Gradients pass straight through the rounding, and for activations through clipping too (a
clipped output that got no gradient could never widen its range); learned steps use torch's
fake-quantize kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_compress.ops import fake_quant_rows
from lightning_compress.ops.packed import pack_rows_int4, unpack_rows_int4

EPS = 1e-12


def weight_qmax(bits: int) -> int:
    """The largest integer of a symmetric ``bits``-bit weight: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale: max |w| of the channel over ``weight_qmax(bits)`` (float32)."""
    peak = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1).float()
    return peak.clamp_min(EPS) / weight_qmax(bits)


def channel_view(per_channel: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``per_channel`` [C] shaped [C, 1, ...] to broadcast over ``like``'s output channels."""
    return per_channel.view(-1, *([1] * (like.dim() - 1)))


def _levels(weight: torch.Tensor, scale_view: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / s), -qmax, qmax)``, ``s`` per channel as :func:`channel_view` has it."""
    qmax = weight_qmax(bits)
    return torch.div(weight.detach(), scale_view).round_().clamp_(-qmax, qmax)


class _RoundToGrid(torch.autograd.Function):
    """Per-channel ``clamp(round(w / s), -qmax, qmax) * s`` with an identity gradient.

    With scales from each channel's own maximum nothing is clipped, so the straight-through
    gradient is exactly the identity. float32 weights take the fused compiled op (two passes);
    others the same arithmetic in PyTorch.
    """

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, bits: int, scale: torch.Tensor | None
    ) -> torch.Tensor:
        if scale is None and weight.dtype == torch.float32:
            return fake_quant_rows(weight.detach(), bits)[0]
        scale = weight_scale(weight, bits) if scale is None else scale
        view = channel_view(scale.to(device=weight.device, dtype=weight.dtype), weight)
        return _levels(weight, view, bits).mul_(view)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def fake_quant_weight(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``weight`` per output channel; the gradient passes straight through.

    Args:
        weight: Any weight with output channels on dim 0.
        bits: 2 to 8.
        scale: Per-channel scales (default: :func:`weight_scale`).
    """
    return _RoundToGrid.apply(weight, bits, scale)


def lsq_init_step(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ's initial step per output channel: 2 * mean|w| / sqrt(Qp), over surviving weights."""
    flat = weight.detach().reshape(weight.shape[0], -1).abs().float()
    count = (flat != 0).sum(dim=1).clamp_min(1)
    return (2.0 * flat.sum(dim=1) / count / weight_qmax(bits) ** 0.5).clamp_min(EPS)


def lsq_fake_quant_weight(weight: torch.Tensor, bits: int, step: torch.Tensor) -> torch.Tensor:
    """Fake quantization with a learned per-channel step (Esser et al. 2020).

    The step's gradient is scaled by 1 / sqrt(N * Qp), N the weights per channel; the weight's
    gradient passes straight through inside the range.
    """
    qmax = weight_qmax(bits)
    per_channel = weight[0].numel()
    zero = torch.zeros_like(step)
    out = torch._fake_quantize_learnable_per_channel_affine(
        weight.float(), step, zero, 0, -qmax, qmax, 1.0 / (per_channel * qmax) ** 0.5
    )
    return out.to(weight.dtype)


def quantize_weight(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """True integers and their per-channel scales: ``weight ~= q * scale[:, None, ...]``.

    Args:
        weight: Any weight with output channels on dim 0.
        bits: 2 to 8.
        scale: Per-channel scales (default: :func:`weight_scale`; LSQ passes its learned step).

    Returns:
        ``(q, scale)``: int8 integers of ``weight``'s shape, float32 scales of shape [C].
    """
    scale = weight_scale(weight, bits) if scale is None else scale.detach().float()
    view = channel_view(scale.to(weight.device), weight)
    return _levels(weight.detach().float(), view, bits).to(torch.int8), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Packs int8 values in [-8, 7] two per byte (low nibble first) into a flat uint8 tensor.

    The flat layout is the kernels' row layout
    (:func:`~lightning_compress.ops.packed.pack_rows_int4`) of one row holding every value.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4: `q` must be int8, got {q.dtype}")
    return pack_rows_int4(q.reshape(1, -1)).reshape(-1)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 values of ``shape``."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"unpack_int4: need {(n + 1) // 2} uint8 bytes for {shape}")
    return unpack_rows_int4(packed.reshape(1, -1), n).view(shape)


class _ActivationGrid(torch.autograd.Function):
    """Per-tensor affine fake quantization whose gradient passes straight through, clipped
    values included: with the clipped estimator an output beyond the observed range gets no
    gradient, so a range observed while activations were small (std-0.02 initialisation)
    could never grow, and the layer would stop learning."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: float, zero_point: int, qmax: int
    ) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, qmax)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


class ActivationObserver:
    """Min/max of a tensor stream (widened at once, narrowed by a moving average), and 8-bit
    asymmetric fake quantization.

    Args:
        momentum: Weight of each new batch's min/max in the moving average.
        bits: Activation bits (8).
    """

    def __init__(self, momentum: float = 0.01, bits: int = 8) -> None:
        self.momentum = momentum
        self.bits = bits
        self.min = torch.tensor(0.0)
        self.max = torch.tensor(0.0)
        self.initialized = False

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Folds the range of ``x`` into the moving average."""
        self.observe(float(x.detach().min()), float(x.detach().max()))

    def observe(self, lo: float, hi: float) -> None:
        """Folds a batch range in: a wider range is taken at once, a narrower one through the
        moving average (the first one initialises it). Activations that grow during training
        (from a small initialisation, as Hugging Face models have) are then never clipped to a
        range that lags behind them, while a single wide batch fades out with the momentum."""
        if not self.initialized:
            self.min, self.max, self.initialized = torch.tensor(lo), torch.tensor(hi), True
        else:
            self.min = torch.minimum(torch.tensor(lo), self.min + self.momentum * (lo - self.min))
            self.max = torch.maximum(torch.tensor(hi), self.max + self.momentum * (hi - self.max))

    def qparams(self) -> tuple[float, int]:
        """Scale and zero-point; the range is widened to contain 0 so 0 is exact."""
        lo, hi = min(float(self.min), 0.0), max(float(self.max), 0.0)
        levels = 2**self.bits - 1
        scale = max((hi - lo) / levels, EPS)
        zero_point = int(min(max(round(-lo / scale), 0), levels))
        return scale, zero_point

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            return x
        scale, zero_point = self.qparams()
        return _ActivationGrid.apply(x, scale, zero_point, 2**self.bits - 1)

    def state_dict(self) -> dict[str, object]:
        return {"min": self.min.clone(), "max": self.max.clone(), "initialized": self.initialized}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.min = torch.as_tensor(state["min"]).float().clone()
        self.max = torch.as_tensor(state["max"]).float().clone()
        self.initialized = bool(state["initialized"])
