"""Loading of the compiled ops, with a pure-PyTorch fallback.

Each op is declared once in Python with :func:`register_op`: its schema, its reference
implementation and its fake (shape) kernel. When ``lightning_compress._C`` is importable, the
compiled kernels registered the schema and real kernels; otherwise the schema is defined here and
the reference serves as the kernel, so ``torch.ops.lightning_compress.<name>`` exists either way and
callers never branch. The fallback announces itself with exactly one warning.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

NAMESPACE = "lightning_compress"
DISABLE_ENV = "LIGHTNING_COMPRESS_DISABLE_EXT"


class CompiledOpsUnavailableWarning(UserWarning):
    """The compiled extension could not be loaded; the pure-PyTorch references run instead."""


@dataclass(frozen=True)
class _LoadResult:
    compiled: bool
    reason: str


def _load() -> _LoadResult:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return _LoadResult(False, f"disabled by {DISABLE_ENV}")
    try:
        importlib.import_module("lightning_compress._C")
    except ImportError as err:
        return _LoadResult(False, f"import failed: {err}")
    return _LoadResult(True, "loaded")


_STATE = _load()
# Defines the schemas of ops the compiled library does not provide (all of them in the fallback).
_FALLBACK_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
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


def _has_schema(name: str) -> bool:
    try:
        torch._C._get_schema(f"{NAMESPACE}::{name}", "")
    except RuntimeError:
        return False
    return True


def register_op(
    schema: str, reference: Callable[..., torch.Tensor], fake: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """Declares an op and returns the callable users go through.

    Args:
        schema: The op's schema without namespace, e.g. ``"pack_bits(Tensor mask) -> Tensor"``.
        reference: Pure-PyTorch implementation: the test oracle and the fallback kernel.
        fake: Shape/dtype-only implementation for tracing and ``torch.compile``.

    Returns:
        A function calling ``torch.ops.lightning_compress.<name>`` (compiled or fallback).
    """
    name = schema.split("(", 1)[0].strip()
    qualname = f"{NAMESPACE}::{name}"
    if not _has_schema(name):
        _FALLBACK_LIB.define(schema)
        _FALLBACK_LIB.impl(name, reference, "CompositeExplicitAutograd")
        uses_reference = True
    else:
        uses_reference = False
    torch.library.register_fake(qualname)(fake)
    # The overload itself, not the packet: skips the packet's overload resolution per call.
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default

    def call(*args, **kwargs):
        if uses_reference:
            _warn_fallback()
        return overload(*args, **kwargs)

    call.__name__ = name
    call.__doc__ = reference.__doc__
    call.reference = reference  # type: ignore[attr-defined]
    call.uses_reference = uses_reference  # type: ignore[attr-defined]
    return call
