"""Packing every layer type users have: Conv1D, convolutions of any geometry, and a reason for
each layer that stays fp32 (grouped and depthwise convs, attention, tied weights, Conv1d)."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.export import (
    ArtifactError,
    PackedConv2d,
    PackedLinear,
    load_into,
    pack,
    read,
    report,
)
from lightning_compress.layout import layout_of, registered_weights
from lightning_compress.quantization import CompressionRecord, QuantizedLayer
from lightning_compress.quantization.fake import fake_quant_weight

from ..users import GPT2Module, ResNet18

ATTENTION = "(its forward reads the weights directly): kept fp32"


def weight_bearing(model):
    """Module names holding a weight, by the layout registry and the 2-D ``*weight`` rule."""
    names = {name.rpartition(".")[0] for name, *_ in registered_weights(model)}
    names |= {
        name.rpartition(".")[0]
        for name, p in model.named_parameters(remove_duplicate=False)
        if name.rpartition(".")[2].endswith("weight") and p.dim() >= 2
    }
    return names


def dequantized(model, names, bits):
    """``model`` with the weights of ``names`` replaced by their per-channel fake-quantized value,
    quantized along each weight's canonical (out, ...) layout."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            module = ref.get_submodule(name)
            layout = layout_of(module)
            canonical = fake_quant_weight(layout.canonical(module.weight).contiguous(), bits)
            module.weight.copy_(layout.uncanonical(canonical))
    return ref


@pytest.fixture
def conv1d():
    """transformers' Conv1D (transformers is in the dev extra; the ResNet tests run without it)."""
    return pytest.importorskip("transformers.pytorch_utils").Conv1D


def assert_partition(path, model):
    art = read(path)
    packed = {e["name"] for e in art.layers}
    kept = {u.name for u in art.unpacked}
    assert not packed & kept
    assert packed | kept == weight_bearing(model)


class EveryKind(nn.Module):
    """One layer of each kind pack meets: packed ones and ones it keeps fp32."""

    def __init__(self, conv1d):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = conv1d(12, 8)  # weight (8, 12): y = x @ W + b
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = self.grouped(self.depthwise(self.stem(x))).flatten(2)
        seq = self.conv1d(y).transpose(1, 2)
        seq = self.attn(seq, seq, seq, need_weights=False)[0].contiguous()
        return self.head(self.b(self.a(self.proj(seq))).mean(1))


REASONS = {
    "depthwise": "depthwise convolution (groups=8): kept fp32",
    "grouped": "grouped convolution (groups=2): kept fp32",
    "conv1d": "Conv1d: no packed kernel: kept fp32",
    "attn": f"nn.MultiheadAttention {ATTENTION}",
    "attn.out_proj": f"inside nn.MultiheadAttention {ATTENTION}",
    "a": "weight tied to b: kept fp32",
    "b": "weight tied to a: kept fp32",
}


def test_every_layer_is_packed_or_listed_with_its_reason(tmp_path, caplog, conv1d):
    torch.manual_seed(0)
    model = EveryKind(conv1d).eval()
    with caplog.at_level(logging.INFO, logger="lightning_compress.export.artifact"):
        path = pack(model, tmp_path / "every.safetensors", bits=8)
    art = read(path)
    assert [e["name"] for e in art.layers] == ["stem", "proj", "head"]
    assert {u.name: u.reason for u in art.unpacked} == REASONS
    assert {u.name: u.type for u in art.unpacked}["attn.out_proj"] == (
        "NonDynamicallyQuantizableLinear"
    )
    assert_partition(path, model)
    assert "pack: 3 layers packed, 7 weight-bearing layers kept fp32" in caplog.text
    assert "grouped convolution (groups=2)" in caplog.text
    text = str(report(path))
    assert "layers kept fp32: 7" in text
    assert all(reason in text for reason in REASONS.values())

    loaded = load_into(EveryKind(conv1d).eval(), path)
    assert isinstance(loaded.proj, PackedLinear) and isinstance(loaded.stem, PackedConv2d)
    assert type(loaded.depthwise) is nn.Conv2d and type(loaded.conv1d) is nn.Conv1d
    assert loaded.b.weight is loaded.a.weight
    x = torch.randn(2, 3, 5, 5)
    ref = dequantized(model, ["stem", "proj", "head"], 8)
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-4, atol=1e-4)


def test_excluded_and_unquantized_layers_are_listed(tmp_path, conv1d):
    model = EveryKind(conv1d).eval()
    art = read(pack(model, tmp_path / "ex.safetensors", exclude=["he*"]))
    reasons = {u.name: u.reason for u in art.unpacked}
    assert reasons["head"] == "excluded by pattern 'he*': kept fp32"
    art = read(pack(model, tmp_path / "none.safetensors", bits=None))
    assert art.layers == []
    assert {u.name: u.reason for u in art.unpacked}["proj"] == "`bits=None`: kept fp32"
    record = CompressionRecord([QuantizedLayer.from_weight("head.weight", model.head.weight, 8)])
    art = read(pack(model, tmp_path / "qat.safetensors", qat=record))
    assert [e["name"] for e in art.layers] == ["head"]
    assert {u.name: u.reason for u in art.unpacked}["stem"] == "not quantized by `qat`: kept fp32"


def test_a_record_for_a_layer_that_cannot_pack_is_reported_dropped(tmp_path, caplog, conv1d):
    model = EveryKind(conv1d).eval()
    record = CompressionRecord(
        [
            QuantizedLayer.from_weight("attn.in_proj_weight", model.attn.in_proj_weight, 8),
            QuantizedLayer.from_weight("depthwise.weight", model.depthwise.weight, 8),
            QuantizedLayer.from_weight("head.weight", model.head.weight, 8),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.artifact"):
        path = pack(model, tmp_path / "drop.safetensors", qat=record)
    reasons = {u.name: u.reason for u in read(path).unpacked}
    assert reasons["attn"] == f"nn.MultiheadAttention {ATTENTION} (its record is not stored)"
    assert reasons["depthwise"].endswith("kept fp32 (its record is not stored)")
    assert reasons["conv1d"] == REASONS["conv1d"]  # not in the record: nothing dropped
    assert "2 compressed weights of the record cannot be packed" in caplog.text
    assert "attn.in_proj_weight, depthwise.weight" in caplog.text


# -- transformers' Conv1D -----------------------------------------------------------------------


class Conv1DNet(nn.Module):
    def __init__(self, conv1d, square=False):
        super().__init__()
        self.up = conv1d(8 if square else 24, 8)
        self.down = conv1d(6, 8 if square else 24)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_a_record_of_canonical_conv1d_integers_packs_as_a_linear(tmp_path, conv1d, bits):
    torch.manual_seed(0)
    model = Conv1DNet(conv1d).eval()
    record = CompressionRecord(
        QuantizedLayer.from_weight(f"{n}.weight", m.weight.t(), bits)  # canonical (out, in)
        for n, m in model.named_children()
    )
    path = pack(model, tmp_path / "c.safetensors", qat=record)
    entry = read(path).layers[0]
    assert entry["module"] == "Conv1D" and entry["kind"] == "linear"
    assert entry["weight_shape"] == [8, 24] and entry["shape"] == [24, 8]
    assert entry["axes"] == [1, 0] and entry["bits"] == bits
    loaded = load_into(Conv1DNet(conv1d).eval(), path)
    assert isinstance(loaded.up, PackedLinear) and isinstance(loaded.down, PackedLinear)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in record.items():
            ref.get_parameter(name).copy_(layer.dequantize().t())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)
    assert [row.bits for row in report(path).layers] == [bits, bits]


def test_conv1d_integers_in_the_stored_order_are_refused(tmp_path, conv1d):
    model = Conv1DNet(conv1d)
    record = CompressionRecord([QuantizedLayer.from_weight("up.weight", model.up.weight, 8)])
    with pytest.raises(ValueError, match=r"canonical \(out, in, \*kernel\) shape is \(24, 8\)"):
        pack(model, tmp_path / "bad.safetensors", qat=record)


def test_a_square_conv1d_artifact_does_not_load_into_a_linear(tmp_path, conv1d):
    path = pack(Conv1DNet(conv1d, square=True), tmp_path / "sq.safetensors")
    linear = nn.Module()
    linear.up, linear.down = nn.Linear(8, 8), nn.Linear(8, 6)
    before = copy.deepcopy(linear.state_dict())
    with pytest.raises(ArtifactError, match=r"axes \[0, 1\] in the model \(Linear\), \[1, 0\]"):
        load_into(linear, path)
    assert type(linear.up) is nn.Linear
    assert all(torch.equal(v, linear.state_dict()[k]) for k, v in before.items())


# -- a user's GPT-2 -----------------------------------------------------------------------------


def _conv1d_names(model, conv1d):
    return [n for n, m in model.named_modules() if isinstance(m, conv1d)]


def _ids(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32, (n, 16), generator=g)


def test_gpt2_post_training_int8_packs_every_conv1d_and_keeps_the_tied_head(tmp_path, conv1d):
    model = GPT2Module(seed=0).model.eval()
    path = pack(model, tmp_path / "gpt2.safetensors", bits=8)
    fresh = GPT2Module(seed=1).model.eval()
    loaded = load_into(fresh, path)
    layers = _conv1d_names(model, conv1d)
    assert len(layers) == 8
    assert all(isinstance(loaded.get_submodule(n), PackedLinear) for n in layers)
    assert type(loaded.lm_head) is nn.Linear
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    reasons = {u.name: u.reason for u in read(path).unpacked}
    assert reasons == {
        "transformer.wte": "Embedding: no packed kernel: kept fp32",
        "transformer.wpe": "Embedding: no packed kernel: kept fp32",
        "lm_head": "weight tied to transformer.wte: kept fp32",
    }
    assert "weight tied to transformer.wte" in str(report(path))
    assert_partition(path, model)
    ids = _ids()
    with torch.no_grad():
        got, want = loaded(ids).logits, dequantized(model, layers, 8)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_gpt2_from_a_record_of_the_lightning_module_at_three_bits(tmp_path, conv1d):
    module = GPT2Module(seed=0).eval()
    weights = {
        f"model.{n}.weight": module.model.get_submodule(n).weight
        for n in _conv1d_names(module.model, conv1d)
    }
    # As QAT hands them over: named in the LightningModule, integers in canonical (out, in).
    record = CompressionRecord(
        (QuantizedLayer.from_weight(n, w.t(), 3) for n, w in weights.items()), root=module
    )
    path = pack(module.model, tmp_path / "gpt2q.safetensors", qat=record)
    assert {e["bits"] for e in read(path).layers} == {3}
    loaded = load_into(GPT2Module(seed=1).model.eval(), path)
    ref = copy.deepcopy(module.model)
    with torch.no_grad():
        for name, layer in record.items():
            ref.get_parameter(name[len("model.") :]).copy_(layer.dequantize().t())
        got, want = loaded(_ids()).logits, ref(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


# -- a user's ResNet-18 -------------------------------------------------------------------------


def _with_statistics(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def test_resnet18_packs_every_convolution(tmp_path):
    torch.manual_seed(0)
    model = _with_statistics(ResNet18(num_classes=4, width=8), 0)
    path = pack(model, tmp_path / "resnet.safetensors", bits=8)
    art = read(path)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # stem, 16 block convolutions, 3 downsamples
    assert [e["name"] for e in art.layers] == [*convs, "fc"]
    assert art.unpacked == []
    assert "layers kept fp32: 0" in str(report(path))
    torch.manual_seed(1)
    loaded = load_into(_with_statistics(ResNet18(num_classes=4, width=8), 1), path)
    assert all(isinstance(loaded.get_submodule(n), PackedConv2d) for n in convs)
    assert isinstance(loaded.fc, PackedLinear)
    x = torch.randn(4, 3, 32, 32)
    want = dequantized(model, [*convs, "fc"], 8)(x)
    torch.testing.assert_close(loaded(x), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding"),
    [(3, 8, 7, 2, 3), (8, 16, 1, 2, 0), (8, 8, 3, 1, 1), (8, 16, 3, 2, 1)],
    ids=["stem-7x7-s2-p3", "downsample-1x1-s2", "3x3-s1", "3x3-s2"],
)
@pytest.mark.parametrize("size", [17, 32])
def test_packed_conv2d_geometry(tmp_path, cin, cout, kernel, stride, padding, size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)).eval()
    loaded = load_into(copy.deepcopy(model), pack(model, tmp_path / "g.safetensors", bits=8))
    assert isinstance(loaded[0], PackedConv2d)
    x = torch.randn(2, cin, size, size)
    weight = fake_quant_weight(model[0].weight, 8)
    torch.testing.assert_close(
        loaded(x), F.conv2d(x, weight, None, stride, padding), rtol=1e-4, atol=1e-4
    )
