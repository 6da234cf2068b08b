"""Packing a compressed model into a compact artifact and running it with the compiled kernels.

``pack(model, path, qat=..., lowrank=...)`` writes the artifact (integer weights, low-rank
factors, or weight sharing's codebooks with Huffman-coded indices:
:mod:`~lightning_compress.export.entropy`), ``load_into(model, path)`` swaps the model's layers
for :class:`PackedLinear` / :class:`PackedConv2d` / :class:`PackedLowRank` (a shared layer: the
float layer holding its decoded weight) and loads the weights, ``report(path)`` tabulates sizes
per layer and every layer kept fp32 with the reason (:func:`plan_layers`), ``compare_packed``
scores and times the reloaded artifact against its network.
Format: :mod:`lightning_compress.export.artifact`.
"""

from lightning_compress.export.artifact import (
    FORMAT_VERSION,
    PACKERS,
    ArtifactError,
    Report,
    load_into,
    pack,
    packer,
    read,
    report,
)
from lightning_compress.export.measure import PackedComparison, compare_packed, evaluate, latency
from lightning_compress.export.modules import PackedConv2d, PackedLinear, PackedLowRank
from lightning_compress.export.plan import UnpackedLayer, packable_layers, plan_layers

__all__ = [
    "FORMAT_VERSION",
    "PACKERS",
    "ArtifactError",
    "PackedComparison",
    "PackedConv2d",
    "PackedLinear",
    "PackedLowRank",
    "Report",
    "UnpackedLayer",
    "compare_packed",
    "evaluate",
    "latency",
    "load_into",
    "pack",
    "packable_layers",
    "packer",
    "plan_layers",
    "read",
    "report",
]
