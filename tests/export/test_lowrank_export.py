"""Low-rank layers in the artifact: two factors per layer, fp32 or quantized per row, reloaded as
PackedLowRank for Linear, transformers' Conv1D and Conv2d."""

import copy
import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from lightning_compress.export import (
    ArtifactError,
    PackedLowRank,
    load_into,
    pack,
    read,
    report,
)
from lightning_compress.export.artifact import FORMAT, checksum
from lightning_compress.export.modules import PackedWeight
from lightning_compress.layout import STANDARD, layout_of
from lightning_compress.lowrank.record import LowRankLayer
from lightning_compress.quantization import ActivationRange, CompressionRecord, QuantizedLayer
from lightning_compress.quantization.fake import fake_quant_weight

from .test_pack import assert_unchanged, snapshot

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is in the dev extra; the Linear stands in for it
    Conv1D = None

RANKS = {"conv": 3, "fc": 4, "proj": 5}


class Tiny(nn.Module):
    """A Conv2d, a Linear and a Conv1D (weight (in, out)) to factor, and a head left as it is."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.proj = Conv1D(12, 16) if Conv1D is not None else nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = F.relu(self.fc(F.relu(self.conv(x)).flatten(1)))
        return self.head(self.proj(y))


def factored(model, bits=None, ranks=RANKS):
    """Sets each named layer's weight to its truncated SVD and returns the record of the factors."""
    layers = []
    with torch.no_grad():
        for name, rank in ranks.items():
            module = model.get_submodule(name)
            layout = layout_of(module) or STANDARD
            u, s, vh = torch.linalg.svd(layout.matrix(module.weight), full_matrices=False)
            first, second = u[:, :rank] * s[:rank], vh[:rank].contiguous()
            module.weight.copy_(layout.from_matrix(first @ second, module.weight.shape))
            layers.append(LowRankLayer(f"{name}.weight", first, second, bits))
    return CompressionRecord(layers)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    return model, factored(model)


def test_fp32_factors_reload_as_the_factored_model(tmp_path, tiny):
    model, record = tiny
    path = pack(model, tmp_path / "lr.safetensors", lowrank=record, bits=None)
    art = read(path)
    assert art.version == 2
    entries = {e["name"]: e for e in art.layers}
    assert set(entries) == set(RANKS) and {e["kind"] for e in entries.values()} == {"lowrank"}
    assert {n: e["rank"] for n, e in entries.items()} == RANKS
    assert {e["bits"] for e in entries.values()} == {None}
    assert entries["conv"]["conv"]["stride"] == [2, 2] and "conv" not in entries["fc"]
    assert entries["proj"]["axes"] == ([1, 0] if Conv1D is not None else [0, 1])
    assert art.tensors["packed/conv/second/weight"].shape == (3, 27)
    loaded = load_into(copy.deepcopy(model), path)
    assert all(isinstance(getattr(loaded, n), PackedLowRank) for n in RANKS)
    assert type(loaded.head) is nn.Linear
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded.conv(x[0]), model.conv(x[0]), rtol=1e-4, atol=1e-5)
    seq = torch.randn(2, 7, 128)  # leading dimensions and another dtype
    torch.testing.assert_close(loaded.fc(seq), model.fc(seq), rtol=1e-4, atol=1e-5)
    assert loaded.fc(seq.double()).dtype == torch.float64


def quantized_factors(layer, bits):
    """The layer's factors on their per-row ``bits``-bit grid, as pack stores them."""
    return fake_quant_weight(layer.first, bits), fake_quant_weight(layer.second, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_factors_compute_their_quantized_product(tmp_path, tiny, bits):
    model, _ = tiny
    record = factored(model, bits)
    path = pack(model, tmp_path / "q.safetensors", lowrank=record, bits=None)
    art = read(path)
    assert {e["bits"] for e in art.layers} == {bits}
    dtype = torch.int8 if bits == 8 else torch.uint8
    assert art.tensors["packed/fc/first/qweight"].dtype == dtype
    assert art.tensors["packed/fc/second/scale"].shape == (RANKS["fc"],)
    loaded = load_into(copy.deepcopy(model), path)
    assert isinstance(loaded.fc.first, PackedWeight) and not loaded.fc.second.sparse
    first, second = quantized_factors(record["fc.weight"], bits)
    h = torch.randn(6, 128)
    ref = F.linear(F.linear(h, second), first, model.fc.bias)
    torch.testing.assert_close(loaded.fc(h), ref, rtol=1e-5, atol=1e-5)
    first, second = quantized_factors(record["conv.weight"], bits)
    x = torch.randn(2, 3, 8, 8)
    ref = F.conv2d(x, second.view(3, 3, 3, 3), None, 2, 1)
    ref = F.conv2d(ref, first.view(8, 3, 1, 1), model.conv.bias)
    torch.testing.assert_close(loaded.conv(x), ref, rtol=1e-5, atol=1e-5)
    if bits == 8:  # close to the fp32 factored model
        out, want = loaded(x), model(x).detach()
        torch.testing.assert_close(out, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_a_layer_in_both_records_packs_as_low_rank_at_its_qat_bits(tmp_path, tiny):
    model, record = tiny
    act = ActivationRange(scale=0.02, zero_point=128, bits=8)
    qat = CompressionRecord(
        QuantizedLayer.from_weight(
            f"{name}.weight",
            (layout_of(m) or STANDARD).canonical(m.weight.detach()).contiguous(),
            4,
            activation=act if name == "fc" else None,
        )
        for name, m in model.named_children()
    )
    explicit = CompressionRecord(
        [dataclasses.replace(record["fc.weight"], bits=8), record["conv.weight"]]
    )
    path = pack(model, tmp_path / "both.safetensors", qat=qat, lowrank=explicit)
    entries = {e["name"]: e for e in read(path).layers}
    assert [entries[n]["kind"] for n in ("conv", "fc", "proj", "head")] == [
        "lowrank",
        "lowrank",
        "linear",
        "linear",
    ]
    assert entries["conv"]["bits"] == 4 and entries["fc"]["bits"] == 8  # the record's own bits
    assert entries["fc"]["act"] == {"scale": 0.02, "zero_point": 128, "bits": 8}
    loaded = load_into(copy.deepcopy(model), path)
    out = loaded.fc(torch.randn(4, 128))
    levels = out / act.scale + act.zero_point
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # on the recorded 8-bit grid

    path = pack(model, tmp_path / "fp32.safetensors", qat=qat, lowrank=record, bits=None)
    assert {e["name"]: e["bits"] for e in read(path).layers} == dict.fromkeys(
        ("conv", "fc", "proj", "head"), 4
    )


def test_pack_refuses_bad_low_rank_records_before_writing(tmp_path, tiny):
    model, record = tiny
    path = tmp_path / "bad.safetensors"
    wrong = LowRankLayer("fc.weight", torch.randn(16, 2), torch.randn(2, 127))
    with pytest.raises(ValueError, match=r"fc\.weight: the low-rank factors .* \(16, 128\)"):
        pack(model, path, lowrank=CompressionRecord([wrong]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    factors = LowRankLayer("0.weight", torch.randn(4, 2), torch.randn(2, 18))
    with pytest.raises(ValueError, match=r"'0\.weight' cannot be packed .*groups=2"):
        pack(grouped, path, lowrank=CompressionRecord([factors]))
    integers = CompressionRecord([QuantizedLayer.from_weight("fc.weight", model.fc.weight, 8)])
    with pytest.raises(TypeError, match="must hold LowRankLayer records, got a QuantizedLayer"):
        pack(model, path, lowrank=integers)
    with pytest.raises(TypeError, match="`lowrank` must be a LowRankCallback or a Compression"):
        pack(model, path, lowrank=dict(record))

    class NotFitted:
        record = None

    with pytest.raises(ValueError, match="`lowrank` holds no low-rank layers"):
        pack(model, path, lowrank=NotFitted())
    assert not list(tmp_path.iterdir())


def test_an_excluded_low_rank_layer_stays_fp32_and_is_said(tmp_path, tiny, caplog):
    model, record = tiny
    with caplog.at_level(logging.WARNING, logger="lightning_compress.export.artifact"):
        path = pack(model, tmp_path / "ex.safetensors", lowrank=record, exclude=["fc"])
    art = read(path)
    assert "fc" not in {e["name"] for e in art.layers}
    assert {u.name: u.reason for u in art.unpacked}["fc"].endswith("(its record is not stored)")
    assert "fc.weight" in caplog.text
    loaded = load_into(copy.deepcopy(model), path)
    assert type(loaded.fc) is nn.Linear and torch.equal(loaded.fc.weight, model.fc.weight)


def test_report_gives_rank_bits_and_the_bytes_replaced(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    record = factored(model, ranks={"0": 4})
    rep = report(pack(model, tmp_path / "r.safetensors", lowrank=record))
    low, head = rep.layers
    assert (low.kind, low.rank, low.bits, head.rank, head.bits) == ("lowrank", 4, 32, None, 8)
    assert low.bytes == (64 * 4 + 4 * 64) * 4 + 64 * 4  # two fp32 factors and the bias
    assert low.fp32_bytes == 64 * 64 * 4 + 64 * 4
    assert rep.fp32_bytes == low.fp32_bytes + head.fp32_bytes + rep.other_bytes
    row = next(line for line in str(rep).splitlines() if line.startswith("0 "))
    assert row.split()[1:5] == ["Linear", "lowrank", "dense", "32"] and row.split()[5] == "4"
    record = factored(model, 8, ranks={"0": 4})
    low = report(pack(model, tmp_path / "r8.safetensors", lowrank=record)).layers[0]
    assert (low.bits, low.bytes) == (8, 64 * 4 + 4 * 64 + (64 + 4) * 4 + 64 * 4)


def test_artifacts_without_low_rank_layers_stay_version_1(tmp_path, tiny):
    model, _ = tiny
    art = read(pack(model, tmp_path / "plain.safetensors"))
    assert art.version == 1 and {e["kind"] for e in art.layers} == {"linear", "conv2d"}


def rewritten(path, edit):
    """A copy of the artifact with its table or tensors edited and a valid checksum."""
    art = read(path)
    layers, tensors = copy.deepcopy(art.layers), dict(art.tensors)
    edit({e["name"]: e for e in layers}, tensors)
    layers_json = json.dumps(layers, separators=(",", ":"))
    unpacked_json = json.dumps([dataclasses.asdict(u) for u in art.unpacked])
    out = path.with_name("edited.safetensors")
    metadata = {
        "format": FORMAT,
        "format_version": str(art.version),
        "layers": layers_json,
        "unpacked": unpacked_json,
        "checksum": checksum(layers_json, tensors, unpacked_json),
    }
    out.write_bytes(save(tensors, metadata=metadata))
    return out


def bigger_second(layers, tensors):
    tensors["packed/fc/second/weight"] = torch.randn(5, 128)


def smaller_rank(layers, tensors):
    layers["fc"]["rank"] = 3


def truncated_integers(layers, tensors):
    tensors["packed/fc/first/qweight"] = tensors["packed/fc/first/qweight"][:-1].clone()


def other_matrix(layers, tensors):
    layers["proj"]["shape"] = [16, 12]


@pytest.mark.parametrize(
    ("bits", "edit"),
    [
        (None, bigger_second),
        (None, smaller_rank),
        (8, smaller_rank),
        (8, truncated_integers),
        (None, other_matrix),
    ],
)
def test_corrupted_low_rank_artifacts_leave_the_model_unchanged(tmp_path, tiny, bits, edit):
    model, _ = tiny
    record = factored(model, bits)
    bad = rewritten(pack(model, tmp_path / "good.safetensors", lowrank=record), edit)
    target = copy.deepcopy(model)
    before = snapshot(target)
    with pytest.raises(ArtifactError, match="is corrupted"):
        load_into(target, bad)
    assert_unchanged(target, before)


def test_a_low_rank_artifact_refuses_another_architecture(tmp_path, tiny):
    model, record = tiny
    path = pack(model, tmp_path / "lr.safetensors", lowrank=record)
    other = Tiny()
    other.fc = nn.Conv2d(128, 16, 1)
    before = snapshot(other)
    with pytest.raises(ArtifactError, match="'fc' is a low-rank linear in the artifact, Conv2d"):
        load_into(other, path)
    assert_unchanged(other, before)
