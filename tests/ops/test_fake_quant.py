import pytest
import torch

from lightning_compress import ops
from lightning_compress.ops.fake_quant import fake_quant_rows_reference


@pytest.mark.parametrize("shape", [(1, 1), (7, 0), (300, 784), (16, 3, 3, 3), (10, 4096)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compiled_is_bit_identical_to_reference(shape, bits, device):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(shape, generator=g)
    if w.numel() and shape[0] > 1:
        w[0] = 0.0  # a fully pruned channel
        w.view(shape[0], -1)[1, ::3] = 0.0
    out, scale = (t.cpu() for t in ops.fake_quant_rows(w.to(device), bits))
    ref_out, ref_scale = fake_quant_rows_reference(w, bits)
    assert torch.equal(out, ref_out) and torch.equal(scale, ref_scale)
    qmax = 2 ** (bits - 1) - 1
    if w.numel():
        levels = out.view(shape[0], -1) / scale[:, None]
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.abs().max() <= qmax + 1e-4
        assert torch.all(out[w == 0] == 0)


def test_non_contiguous_input():
    w = torch.randn(64, 32).t()
    out, scale = ops.fake_quant_rows(w, 8)
    ref_out, ref_scale = fake_quant_rows_reference(w.contiguous(), 8)
    assert torch.equal(out, ref_out) and torch.equal(scale, ref_scale)


def test_opcheck(device):
    op = torch.ops.lightning_compress.fake_quant_rows.default
    torch.library.opcheck(op, (torch.randn(9, 5, device=device), 4))
    torch.library.opcheck(op, (torch.randn(5, 9, device=device).t(), 8))


@pytest.mark.parametrize(
    ("weight", "bits", "match"),
    [(torch.ones(2, 2), 9, "bits"), (torch.ones(2, 2, dtype=torch.float64), 8, "float32")],
)
def test_bad_inputs(weight, bits, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.fake_quant_rows(weight, bits)
