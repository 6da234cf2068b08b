"""The ops' schemas, the compiled library's loading, and the reference as the kernel of last resort.

Every op's schema is written once, in :data:`SCHEMAS`, and defined here before
``lightning_compress._C`` is imported: the compiled library only registers kernels (CPU, and
CUDA where it was built with a toolkit), which the dispatcher checks against these schemas as
they register. Each op module then declares its op with :func:`register_op`: its pure-PyTorch
reference becomes the ``CompositeExplicitAutograd`` kernel, which serves every device the
compiled library has no kernel for (a kernel registered for CPU or CUDA takes precedence on that
device), and its fake kernel serves ``meta`` tensors, tracing and ``torch.compile``. So
``torch.ops.lightning_compress.<name>`` runs on any device, with or without the compiled library,
and callers never branch. Running without the compiled library announces itself with exactly one
warning.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

NAMESPACE = "lightning_compress"
DISABLE_ENV = "LIGHTNING_COMPRESS_DISABLE_EXT"

SCHEMAS: tuple[str, ...] = (
    "pack_bits(Tensor mask) -> Tensor",
    "unpack_bits(Tensor packed, int numel) -> Tensor",
    "fake_quant_rows(Tensor weight, int bits) -> (Tensor, Tensor)",
    "flip_count_(Tensor param, Tensor(a!) sign, Tensor(b!) flips) -> ()",
    "masked_noise_(Tensor(a!) grad, Tensor? keep, Tensor noise, float lam) -> ()",
    (
        "sparse_int_linear(Tensor x, Tensor row_ptr, Tensor col, Tensor values, Tensor scale, "
        "Tensor? bias, int in_features, float act_scale=0., int act_zero_point=0, "
        "int act_qmax=255) -> Tensor"
    ),
    (
        "int_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, int bits, "
        "float act_scale=0., int act_zero_point=0, int act_qmax=255) -> Tensor"
    ),
    (
        "lut_sparse_linear(Tensor x, Tensor row_ptr, Tensor col, Tensor idx, Tensor codebook, "
        "int group_rows, Tensor? bias, int in_features, float act_scale=0., "
        "int act_zero_point=0, int act_qmax=255) -> Tensor"
    ),
    "hugepage_copy(Tensor t) -> Tensor",
    "shared_weight_forward(Tensor weight, Tensor indices, Tensor codebook) -> Tensor",
    (
        "shared_weight_backward_(Tensor(a!) grad, Tensor weight, Tensor indices, int groups, "
        "int levels) -> Tensor"
    ),
    (
        "bitmask_dyn_linear(Tensor x, Tensor row_ptr, Tensor mask, Tensor values, Tensor row_sum, "
        "Tensor scale, Tensor? bias, int in_features, float act_scale=0., int act_zero_point=0, "
        "int act_qmax=255) -> Tensor"
    ),
    (
        "block_dyn_linear(Tensor x, Tensor row_ptr, Tensor group, Tensor values, Tensor row_sum, "
        "Tensor scale, Tensor? bias, int in_features, float act_scale=0., int act_zero_point=0, "
        "int act_qmax=255) -> Tensor"
    ),
)
OPS: dict[str, str] = {schema.split("(", 1)[0]: schema for schema in SCHEMAS}


class CompiledOpsUnavailableWarning(UserWarning):
    """The compiled extension could not be loaded; the pure-PyTorch references run instead."""


@dataclass(frozen=True)
class _LoadResult:
    compiled: bool
    reason: str


def _define_schemas() -> torch.library.Library:
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    return lib


def _load() -> _LoadResult:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return _LoadResult(False, f"disabled by {DISABLE_ENV}")
    try:
        importlib.import_module("lightning_compress._C")
    except ImportError as err:
        return _LoadResult(False, f"import failed: {err}")
    return _LoadResult(True, "loaded")


# Kept alive for the process: destroying the library would take the schemas and the reference
# and fake kernels with it. Schemas first, so that a compiled library whose kernels disagree with
# them (a stale build) fails at import instead of misbehaving later.
_LIB = _define_schemas()
_STATE = _load()
_warned = False


def compiled_available() -> bool:
    """Whether the compiled extension is loaded."""
    return _STATE.compiled


def fallback_reason() -> str:
    """Why the compiled extension is or is not in use, for diagnostics."""
    return _STATE.reason


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "lightning-compress compiled ops are unavailable "
            f"({_STATE.reason}); using the pure-PyTorch reference implementations, which are "
            "slower. Reinstall with `pip install --no-build-isolation -e .` to build them.",
            CompiledOpsUnavailableWarning,
            stacklevel=3,
        )


def register_op(
    name: str, reference: Callable[..., object], fake: Callable[..., object]
) -> Callable[..., object]:
    """Registers the reference and fake kernels of an op of :data:`SCHEMAS`.

    Args:
        name: The op's name, e.g. ``"pack_bits"``.
        reference: Pure-PyTorch implementation with the schema's signature: the test oracle and
            the kernel of every device without a compiled one.
        fake: Shape/dtype-only implementation for ``meta`` tensors, tracing and
            ``torch.compile``; it checks the op's shape and dtype preconditions.

    Returns:
        A function with ``reference``'s signature and docstring calling
        ``torch.ops.lightning_compress.<name>``, with attributes ``reference`` and
        ``uses_reference`` (whether CPU tensors run the reference, the compiled library lacking).

    Raises:
        KeyError: If ``name`` has no schema in :data:`SCHEMAS`.
    """
    if name not in OPS:
        raise KeyError(f"`name` must be an op of SCHEMAS ({', '.join(OPS)}), got {name!r}")
    qualname = f"{NAMESPACE}::{name}"
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=_LIB)
    uses_reference = not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    # The overload itself, not the packet: skips the packet's overload resolution per call.
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default

    @functools.wraps(reference)
    def call(*args, **kwargs):
        if uses_reference:
            _warn_fallback()
        return overload(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.reference = reference  # type: ignore[attr-defined]
    call.uses_reference = uses_reference  # type: ignore[attr-defined]
    return call
