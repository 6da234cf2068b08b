import pytest
import torch

from lightning_compress import ops
from lightning_compress.ops.bitmask import pack_bits_reference, unpack_bits_reference

SHAPES = [(0,), (1,), (7,), (8,), (9,), (3, 5), (300, 784), (2, 3, 5, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_matches_reference_and_round_trips(shape, density, device):
    torch.manual_seed(0)
    mask = torch.rand(shape) < density
    packed = ops.pack_bits(mask.to(device))
    expected = pack_bits_reference(mask)
    assert packed.dtype == torch.uint8 and packed.device.type == device
    assert torch.equal(packed.cpu(), expected)
    assert packed.numel() == (mask.numel() + 7) // 8
    unpacked = ops.unpack_bits(packed, mask.numel())
    assert torch.equal(unpacked.cpu(), unpack_bits_reference(expected, mask.numel()))
    assert torch.equal(unpacked.view(shape).cpu(), mask)


def test_bit_order_is_lsb_first():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert ops.pack_bits(mask).tolist() == [1, 2]


@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_opcheck(op, device):
    torch.manual_seed(0)
    mask = (torch.rand(37) < 0.5).to(device)
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
