"""The schema table, the compiled library's kernels, and the reference as every other device's."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_compress
from lightning_compress import ops
from lightning_compress.ops._library import OPS, SCHEMAS
from lightning_compress.ops.bitmask import pack_bits_reference
from lightning_compress.ops.dyn_linear import bitmask_layout, block_layout
from lightning_compress.ops.lut import lut_layout
from lightning_compress.ops.packed import pack_rows_int4, sparse_layout

PACKAGE = Path(lightning_compress.__file__).parent
NO_EXT = os.environ.get("LIGHTNING_COMPRESS_BUILD_EXT") == "0"
# Backends with no compiled kernel on a CPU-only build; CUDA has some where built with a toolkit.
OTHER_DEVICES = ("CUDA", "XPU", "MPS", "PrivateUse1")


def samples() -> dict[str, tuple]:
    """One call's arguments per op, on CPU."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-7, 8, (6, 11), dtype=torch.int8, generator=g)
    q[torch.rand(6, 11, generator=g) < 0.5] = 0
    x, scale, bias = torch.randn(3, 11, generator=g), torch.rand(6, generator=g), torch.randn(6)
    mask = torch.rand(37, generator=g) < 0.5
    return {
        "pack_bits": (mask,),
        "unpack_bits": (pack_bits_reference(mask), 37),
        "fake_quant_rows": (torch.randn(9, 5, generator=g), 4),
        "flip_count_": (
            torch.randn(37, generator=g),
            torch.sign(torch.randn(37, generator=g)).to(torch.int8),
            torch.randint(0, 3, (37,), dtype=torch.int32, generator=g),
        ),
        "masked_noise_": (
            torch.randn(37, generator=g),
            (torch.rand(37, generator=g) < 0.5).float(),
            torch.randn(37, generator=g),
            0.5,
        ),
        "sparse_int_linear": (x, *sparse_layout(q), scale, bias, 11),
        "int_linear": (x, pack_rows_int4(q), scale, None, 4),
        "hugepage_copy": (torch.randn(4, 5, generator=g).t(),),
        "bitmask_dyn_linear": (x, *bitmask_layout(q), scale, bias, 11),
        "block_dyn_linear": (x, *block_layout(q), scale, None, 11, 0.05, 3, 255),
        "shared_weight_forward": (
            torch.where(q != 0, torch.randn(6, 11, generator=g), 0.0),
            (q + 8).to(torch.uint8),
            torch.randn(2, 16, generator=g),
        ),
        "shared_weight_backward_": (
            torch.randn(6, 11, generator=g),
            torch.where(q != 0, torch.randn(6, 11, generator=g), 0.0),
            (q + 8).to(torch.uint8),
            2,
            16,
        ),
        "lut_sparse_linear": (
            x,
            *lut_layout(torch.randn(3, 16, generator=g), (q + 8).to(torch.uint8), q != 0),
            bias,
            11,
        ),
    }


def _map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map(fn, v) for v in value)
    return value


def _clone(args: tuple) -> tuple:
    return _map(torch.clone, args)


def _kernel_line(qualname: str, key: str) -> str:
    """The line of the computed dispatch table saying which kernel ``key`` runs."""
    table = torch._C._dispatch_dump_table(qualname)
    return next(line for line in table.splitlines() if line.startswith(f"{key}:"))


def _joined_literals(text: str) -> str:
    # Adjacent string literals, as Python and C++ join them.
    return re.sub(r'"\s*\)?\s*\n\s*\(?\s*"', "", text)


def test_every_schema_is_written_once_in_the_package():
    sources = {
        p: _joined_literals(p.read_text())
        for p in PACKAGE.rglob("*")
        if p.suffix in {".py", ".cpp", ".cu", ".h"} and "__pycache__" not in p.parts
    }
    assert any(p.suffix == ".cu" for p in sources) and any(p.suffix == ".cpp" for p in sources)
    for schema in SCHEMAS:
        name = schema.split("(", 1)[0]
        full = [p for p, text in sources.items() for _ in range(text.count(f'"{schema}"'))]
        opened = [p for p, text in sources.items() for _ in range(text.count(f'"{name}('))]
        assert full == opened == [PACKAGE / "ops" / "_library.py"], (schema, full, opened)
    for path, text in sources.items():
        if path.suffix != ".py":
            assert not re.search(r"\bm\.def\(|TORCH_LIBRARY(_FRAGMENT)?\(", text), path


def test_every_op_is_exposed_with_the_references_signature_and_docstring():
    wrappers = {name: getattr(ops, name) for name in OPS}
    for name, call in wrappers.items():
        assert call.__name__ == name
        assert call.__doc__ == call.reference.__doc__
        assert inspect.signature(call) == inspect.signature(call.reference)


@pytest.mark.parametrize("name", list(OPS))
def test_reference_and_fake_are_registered(name):
    qualname = f"lightning_compress::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")


@pytest.mark.skipif(NO_EXT, reason="installed without the compiled ops")
def test_compiled_library_registers_a_cpu_kernel_for_every_op():
    assert ops.compiled_available(), ops.fallback_reason()
    for name in OPS:
        qualname = f"lightning_compress::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), name
        assert not getattr(ops, name).uses_reference, name


@pytest.mark.skipif(NO_EXT, reason="installed without the compiled ops")
@pytest.mark.parametrize("name", list(OPS))
def test_compiled_kernels_take_precedence_and_the_reference_serves_every_other_device(name):
    qualname = f"lightning_compress::{name}"
    assert "csrc/" in _kernel_line(qualname, "CPU")
    for key in OTHER_DEVICES:
        line = _kernel_line(qualname, key)
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
            assert "csrc/cuda/" in line, line
        else:
            assert "ops/_library.py" in line and "[default backend kernel]" in line, line


@pytest.mark.parametrize("name", list(OPS))
def test_a_device_without_a_compiled_kernel_runs_the_reference(name):
    """Dispatched as for a tensor of each such device (the inputs stay CPU tensors), with the
    compiled library loaded: the reference's exact results, close to the compiled kernel's."""
    args = samples()[name]
    call = getattr(ops, name)
    overload = getattr(torch.ops.lightning_compress, name).default
    direct = _clone(args)
    expected = [call.reference(*direct), *direct]
    compiled = _clone(args)
    near = [call(*compiled), *compiled]
    qualname = f"lightning_compress::{name}"
    for key in OTHER_DEVICES:
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
            continue
        dispatched = _clone(args)
        keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        got = [overload.redispatch(keys, *dispatched), *dispatched]
        for value, want, compiled_value in zip(got, expected, near, strict=True):
            if isinstance(value, torch.Tensor | tuple):
                torch.testing.assert_close(value, want, rtol=0, atol=0)
                torch.testing.assert_close(value, compiled_value, rtol=1e-5, atol=1e-4)
            else:
                assert value == want == compiled_value


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_runs_on_meta(name):
    args = samples()[name]
    expected = getattr(ops, name).reference(*_clone(args))
    out = getattr(torch.ops.lightning_compress, name)(*_map(lambda t: t.to("meta"), args))
    if expected is None:
        assert out is None
        return
    pairs = zip(out, expected, strict=True) if isinstance(out, tuple) else [(out, expected)]
    for got, want in pairs:
        assert got.device.type == "meta"
        assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())


def _meta(*args):
    return tuple(_map(lambda t: t.to("meta"), args))


@pytest.mark.parametrize(
    ("name", "args", "error", "match"),
    [
        ("pack_bits", lambda: _meta(torch.zeros(4)), TypeError, "bool"),
        ("unpack_bits", lambda: _meta(torch.zeros(2, dtype=torch.uint8), 30), ValueError, "numel"),
        ("fake_quant_rows", lambda: _meta(torch.ones(2, 2), 9), ValueError, "bits"),
        ("fake_quant_rows", lambda: _meta(torch.ones(()), 8), ValueError, "output-channel"),
        (
            "flip_count_",
            lambda: _meta(torch.ones(3), torch.zeros(4, dtype=torch.int8), torch.zeros(3).int()),
            ValueError,
            "same shape",
        ),
        (
            "masked_noise_",
            lambda: _meta(torch.ones(3), None, torch.ones(3).double(), 1.0),
            ValueError,
            "`noise` must match",
        ),
        (
            "sparse_int_linear",
            lambda: _meta(torch.ones(1, 4), *samples()["sparse_int_linear"][1:]),
            ValueError,
            "features",
        ),
        (
            "int_linear",
            lambda: _meta(*samples()["int_linear"][:4], 8),
            ValueError,
            "8-bit `qweight`",
        ),
        (
            "bitmask_dyn_linear",
            lambda: _meta(torch.ones(1, 4), *samples()["bitmask_dyn_linear"][1:]),
            ValueError,
            "features",
        ),
        (
            "block_dyn_linear",
            lambda: _meta(
                *samples()["block_dyn_linear"][:4],
                torch.ones(6),
                *samples()["block_dyn_linear"][5:],
            ),
            ValueError,
            "`row_sum` must be",
        ),
    ],
)
def test_fake_kernels_check_the_preconditions(name, args, error, match):
    with pytest.raises(error, match=match):
        getattr(torch.ops.lightning_compress, name)(*args())


FALLBACK_SCRIPT = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from lightning_compress import ops
    from lightning_compress.ops._library import OPS
    mask = torch.rand(100) < 0.5
    for _ in range(3):
        packed = ops.pack_bits(mask)
        assert torch.equal(ops.unpack_bits(packed, 100), mask)
mine = [w for w in caught if issubclass(w.category, ops.CompiledOpsUnavailableWarning)]
assert not ops.compiled_available()
assert all(getattr(ops, name).uses_reference for name in OPS)
print("warnings:", len(mine))
print(mine[0].message if mine else "")
"""


def test_without_the_compiled_library_the_reference_runs_with_one_warning():
    env = dict(os.environ, LIGHTNING_COMPRESS_DISABLE_EXT="1")
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "warnings: 1" in out
    assert "pure-PyTorch reference" in out
