"""Fake quantizers, integer conversion and int4 packing, without a Trainer."""

import pytest
import torch

from lightning_compress.ops.packed import pack_rows_int4
from lightning_compress.quantization import (
    fake_quant_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_qmax,
    weight_scale,
)
from lightning_compress.quantization.fake import lsq_fake_quant_weight, lsq_init_step


def weight(*shape, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    w.view(shape[0], -1)[0] = 0.0  # a fully pruned channel
    w.view(shape[0], -1)[1, ::2] = 0.0  # a half-pruned one
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_fake_quant_is_per_channel_symmetric_and_keeps_zeros(bits, shape):
    w = weight(*shape)
    fake = fake_quant_weight(w, bits)
    scale = weight_scale(w, bits)
    levels = fake.view(shape[0], -1) / scale[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= weight_qmax(bits) + 1e-4
    assert torch.all(fake[w == 0] == 0)  # zero-point 0: pruned weights stay exactly zero
    peak = w.view(shape[0], -1).abs().amax(dim=1)
    assert torch.allclose(fake.view(shape[0], -1).abs().amax(dim=1), peak, atol=1e-6)


def test_the_gradient_passes_straight_through():
    w = weight(5, 7).requires_grad_(True)
    grad = torch.randn(5, 7)
    fake_quant_weight(w, 4).backward(grad)
    assert torch.equal(w.grad, grad)


def test_the_fused_op_and_the_pytorch_path_agree():
    w = weight(16, 9)
    fused = fake_quant_weight(w, 4)  # float32 on the CPU: the compiled op
    by_scale = fake_quant_weight(w, 4, weight_scale(w, 4))  # the same arithmetic in PyTorch
    assert torch.allclose(fused, by_scale, atol=1e-7)
    double = fake_quant_weight(w.double(), 4)
    assert double.dtype == torch.float64 and torch.allclose(double.float(), fused, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 8])
def test_integers_and_scales_reproduce_the_fake_quantized_weight(bits):
    w = weight(8, 2, 3, 3)
    q, scale = quantize_weight(w, bits)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (8,)
    assert int(q.abs().max()) <= weight_qmax(bits)
    dequant = q.float() * scale.view(-1, 1, 1, 1)
    assert torch.allclose(dequant, fake_quant_weight(w, bits), atol=1e-6)
    assert torch.all((dequant - w).abs() <= scale.view(-1, 1, 1, 1) / 2 + 1e-7)


def test_lsq_steps_start_from_the_surviving_weights_and_quantize_on_their_grid():
    w = weight(4, 10)
    step = lsq_init_step(w, 4)
    survivors = w.view(4, -1)[1:]
    expected = 2 * survivors.abs().sum(1) / (survivors != 0).sum(1) / 7**0.5
    assert torch.allclose(step[1:], expected)
    assert step[0] > 0  # an empty channel keeps a usable step
    fake = lsq_fake_quant_weight(w, 4, step)
    q, scale = quantize_weight(w, 4, step)
    assert torch.equal(scale, step) and torch.allclose(q.float() * step[:, None], fake, atol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (2, 3, 3)])
def test_int4_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == ((q.numel() + 1) // 2,)
    assert torch.equal(unpack_int4(packed, shape), q)


def test_int4_flat_layout_is_the_kernels_row_layout_of_one_row():
    q = torch.tensor([1, -2, 7, -8, 3], dtype=torch.int8)
    assert pack_int4(q).tolist() == [(1 & 0xF) | ((-2 & 0xF) << 4), 7 | (8 << 4), 3]
    assert torch.equal(pack_int4(q), pack_rows_int4(q.view(1, -1)).view(-1))


def test_int4_bad_inputs():
    with pytest.raises(TypeError, match="`q` must be int8"):
        pack_int4(torch.zeros(4, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"values must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(ValueError, match="need 2 uint8 bytes"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), (4,))
