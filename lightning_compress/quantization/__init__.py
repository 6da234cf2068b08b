"""Trainer-free quantization: fake quantizers, observers, BN folding, integer conversion."""

from lightning_compress.quantization.fake import (
    ActivationObserver,
    fake_quant_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_qmax,
    weight_scale,
)

__all__ = [
    "ActivationObserver",
    "fake_quant_weight",
    "pack_int4",
    "quantize_weight",
    "unpack_int4",
    "weight_qmax",
    "weight_scale",
]
