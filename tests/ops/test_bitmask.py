import os
import subprocess
import sys

import pytest
import torch

from lightning_compress import ops
from lightning_compress.ops.bitmask import pack_bits_reference, unpack_bits_reference

SHAPES = [(0,), (1,), (7,), (8,), (9,), (3, 5), (300, 784), (2, 3, 5, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_matches_reference_and_round_trips(shape, density):
    torch.manual_seed(0)
    mask = torch.rand(shape) < density
    packed = ops.pack_bits(mask)
    expected = pack_bits_reference(mask)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, expected)
    assert packed.numel() == (mask.numel() + 7) // 8
    unpacked = ops.unpack_bits(packed, mask.numel())
    assert torch.equal(unpacked, unpack_bits_reference(expected, mask.numel()))
    assert torch.equal(unpacked.view(shape), mask)


def test_bit_order_is_lsb_first():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert ops.pack_bits(mask).tolist() == [1, 2]


@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_opcheck(op):
    torch.manual_seed(0)
    mask = torch.rand(37) < 0.5
    if op == "pack":
        torch.library.opcheck(torch.ops.lightning_compress.pack_bits.default, (mask,))
    else:
        packed = pack_bits_reference(mask)
        torch.library.opcheck(torch.ops.lightning_compress.unpack_bits.default, (packed, 37))


def test_unpack_rejects_wrong_length():
    with pytest.raises((RuntimeError, ValueError), match="numel"):
        ops.unpack_bits(torch.zeros(2, dtype=torch.uint8), 30)


def test_pack_rejects_non_bool():
    with pytest.raises((RuntimeError, TypeError), match="bool"):
        ops.pack_bits(torch.zeros(4))


def test_compiled_kernel_is_the_one_dispatched():
    if os.environ.get("LIGHTNING_COMPRESS_BUILD_EXT") == "0":
        pytest.skip("installed without the compiled ops")
    assert ops.compiled_available(), ops.fallback_reason()
    assert not ops.pack_bits.uses_reference
    dump = torch._C._dispatch_dump("lightning_compress::pack_bits")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    # The CPU kernel must come from the C++ source, not from the Python fallback registration.
    assert "csrc/bitmask.cpp" in cpu_line, dump


FALLBACK_SCRIPT = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from lightning_compress import ops
    mask = torch.rand(100) < 0.5
    for _ in range(3):
        packed = ops.pack_bits(mask)
        assert torch.equal(ops.unpack_bits(packed, 100), mask)
mine = [w for w in caught if issubclass(w.category, ops.CompiledOpsUnavailableWarning)]
assert not ops.compiled_available()
assert ops.pack_bits.uses_reference
print("warnings:", len(mine))
print(mine[0].message if mine else "")
"""


def test_fallback_runs_reference_with_one_warning():
    env = dict(os.environ, LIGHTNING_COMPRESS_DISABLE_EXT="1")
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "warnings: 1" in out
    assert "pure-PyTorch reference" in out
