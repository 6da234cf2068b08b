"""Trainer-free quantization: fake quantizers, observers, BN folding, integer conversion, weight
sharing (k-means codebooks)."""

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
from lightning_compress.quantization.kmeans import (
    SharedWeight,
    kmeans_1d,
    pack_indices,
    unpack_indices,
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
    "SharedWeight",
    "fake_quant_weight",
    "kmeans_1d",
    "pack_indices",
    "pack_int4",
    "quantize_weight",
    "unpack_indices",
    "unpack_int4",
    "weight_qmax",
    "weight_scale",
]
