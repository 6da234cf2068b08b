"""Trainer-free quantization: fake quantizers, observers, BN folding, integer conversion."""

from lightning_compress.quantization.config import QATConfig
from lightning_compress.quantization.fake import (
    ActivationObserver,
    fake_quant_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_qmax,
    weight_scale,
)
from lightning_compress.quantization.record import (
    ActivationRange,
    CompressionRecord,
    LayerRecord,
    QuantizedLayer,
    RecordSource,
    SharedLayer,
)

__all__ = [
    "ActivationObserver",
    "ActivationRange",
    "CompressionRecord",
    "LayerRecord",
    "QATConfig",
    "QuantizedLayer",
    "RecordSource",
    "SharedLayer",
    "fake_quant_weight",
    "pack_int4",
    "quantize_weight",
    "unpack_int4",
    "weight_qmax",
    "weight_scale",
]
