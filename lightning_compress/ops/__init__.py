"""Python face of the compiled ops: schemas, references, fake kernels and the loader."""

from lightning_compress.ops._library import (
    CompiledOpsUnavailableWarning,
    compiled_available,
    fallback_reason,
)
from lightning_compress.ops.bitmask import pack_bits, unpack_bits

__all__ = [
    "CompiledOpsUnavailableWarning",
    "compiled_available",
    "fallback_reason",
    "pack_bits",
    "unpack_bits",
]
