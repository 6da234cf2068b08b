"""Python face of the compiled ops: schemas, references, fake kernels and the loader."""

from lightning_compress.ops._library import (
    CompiledOpsUnavailableWarning,
    compiled_available,
    fallback_reason,
)
from lightning_compress.ops.bitmask import pack_bits, unpack_bits
from lightning_compress.ops.dyn_linear import bitmask_dyn_linear, block_dyn_linear
from lightning_compress.ops.fake_quant import fake_quant_rows
from lightning_compress.ops.flips import flip_count_, masked_noise_
from lightning_compress.ops.lut import lut_sparse_linear
from lightning_compress.ops.packed import hugepage_copy, int_linear, sparse_int_linear
from lightning_compress.ops.shared_weight import shared_weight_backward_, shared_weight_forward

__all__ = [
    "CompiledOpsUnavailableWarning",
    "bitmask_dyn_linear",
    "block_dyn_linear",
    "compiled_available",
    "fake_quant_rows",
    "fallback_reason",
    "flip_count_",
    "hugepage_copy",
    "int_linear",
    "lut_sparse_linear",
    "masked_noise_",
    "pack_bits",
    "shared_weight_backward_",
    "shared_weight_forward",
    "sparse_int_linear",
    "unpack_bits",
]
