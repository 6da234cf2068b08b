"""Fake quantization through hooks on a plain model, BatchNorm folding and conversion."""

import copy

import pytest
import torch
from torch import nn

from lightning_compress.quantization import (
    CompressionRecord,
    QuantizedLayer,
    fake_quant_weight,
    quantize_weight,
)
from lightning_compress.quantization.layers import FakeQuantLayers, conv_bn_pairs, fold_scale


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def conv_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


def test_hooks_swap_in_the_fake_quantized_weights_and_come_off_cleanly():
    model = mlp()
    plain = copy.deepcopy(model)
    layers = FakeQuantLayers(model, {"0.weight": 4, "2.weight": 8}, {}, activations=None)
    x = torch.randn(5, 6)
    with layers.installed():
        assert torch.equal(model(x), plain(x))  # installed but not enabled: float
        layers.enabled = True
        manual = copy.deepcopy(plain)
        with torch.no_grad():
            manual[0].weight.copy_(fake_quant_weight(plain[0].weight, 4))
            manual[2].weight.copy_(fake_quant_weight(plain[2].weight, 8))
        assert torch.allclose(model(x), manual(x), atol=1e-6)
        assert model[0].weight is dict(model.named_parameters())["0.weight"]  # restored
    assert torch.equal(model(x), plain(x))  # hooks off
    assert list(model.state_dict()) == list(plain.state_dict())


def test_installed_keeps_hooks_that_were_already_on():
    layers = FakeQuantLayers(mlp(), {"0.weight": 8}, {}, activations=None)
    layers.install()
    with layers.installed():
        pass
    assert layers._handles  # still on: the block did not put them there
    layers.remove()
    assert not layers._handles


def test_conv_bn_pairs_and_fold_factor():
    model = conv_bn()
    assert conv_bn_pairs(model) == {"0": "1"}
    bn = model[1]
    expected = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(fold_scale(bn), expected.detach())
    bn.weight.data[0] = 0.0
    assert fold_scale(bn)[0] != 0  # never exactly zero: it is divided by
    assert conv_bn_pairs(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(5))) == {}


def test_conversion_reproduces_the_fake_quantized_forward_with_the_fold_divided_out():
    model = conv_bn()
    layers = FakeQuantLayers(model, {"0.weight": 8}, {"0": "1"}, activations=None)
    layers.enabled = True
    x = torch.randn(3, 2, 6, 6)
    with layers.installed(), torch.no_grad():
        fake = model(x)
    record = layers.convert()
    assert isinstance(record, CompressionRecord) and list(record) == ["0.weight"]
    layer = record["0.weight"]
    assert isinstance(layer, QuantizedLayer) and layer.kind == "int" and layer.bits == 8
    fold = fold_scale(model[1]).view(-1, 1, 1, 1)
    # The integers are those of the folded weight; values * scale is the conv's own weight.
    q, scale = quantize_weight(model[0].weight.detach() * fold, 8)
    assert torch.equal(layer.values, q) and torch.equal(layer.scale, scale / fold.view(-1))
    converted = copy.deepcopy(model)
    with torch.no_grad():
        converted[0].weight.copy_(layer.dequantize())
        assert torch.allclose(converted(x), fake, atol=1e-5)


def test_conversion_takes_each_layers_activation_range():
    model = mlp()
    layers = FakeQuantLayers(model, {"0.weight": 8, "2.weight": 8}, {}, activations=8)
    layers.observers["0"].observe(-1.0, 3.0)
    record = layers.convert()
    assert record["0.weight"].activation.scale == pytest.approx(4.0 / 255)
    assert record["0.weight"].activation.zero_point == 64
    assert record["2.weight"].activation is None  # never observed


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("before", [True, False])
def test_attention_fast_path_is_off_only_while_the_hooks_are_on(before):
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(before)
    try:
        layers = FakeQuantLayers(Attention(), {"attn.in_proj_weight": 8}, {}, activations=8)
        layers.install()
        layers.install()  # a second install changes nothing, and remembers nothing new
        assert torch.backends.mha.get_fastpath_enabled() is False
        layers.remove()
        assert torch.backends.mha.get_fastpath_enabled() is before
        layers.remove()
        assert torch.backends.mha.get_fastpath_enabled() is before
        FakeQuantLayers(mlp(), {"0.weight": 8}, {}, activations=None).install()
        assert torch.backends.mha.get_fastpath_enabled() is before  # no attention: untouched
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def test_an_unknown_output_layer_quantizes_every_observed_output():
    """A checkpoint written before the output layer was recorded was trained with every output
    quantized; its record must keep every activation range."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    layers = FakeQuantLayers(model, {"0.weight": 8, "1.weight": 8}, {}, 8, quantize_output=False)
    assert layers.output_layer is None
    assert layers.quantizes_output("0") and layers.quantizes_output("1")
    layers.output_layer = "1"
    assert layers.quantizes_output("0") and not layers.quantizes_output("1")
