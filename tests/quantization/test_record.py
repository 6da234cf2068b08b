"""The typed record between a compression method and export."""

import dataclasses

import pytest
import torch
from torch import nn

from lightning_compress.quantization import (
    ActivationRange,
    CompressionRecord,
    QuantizedLayer,
    RecordSource,
    quantize_weight,
)


def layer(name="fc.weight", bits=8, seed=0):
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    return QuantizedLayer.from_weight(name, w, bits), w


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integers_and_scales_round_trip(bits):
    record, w = layer(bits=bits)
    q, scale = quantize_weight(w, bits)
    assert torch.equal(record.values, q) and torch.equal(record.scale, scale)
    assert torch.allclose(record.dequantize(), q.float() * scale[:, None])
    assert record.values.device.type == "cpu" and record.activation is None


def test_a_fold_is_divided_out_of_the_scale():
    w = torch.randn(3, 2, 3, 3)
    fold = torch.tensor([0.5, 2.0, 1.5]).view(-1, 1, 1, 1)
    record = QuantizedLayer.from_weight("conv.weight", w * fold, 8, fold=fold)
    q, scale = quantize_weight(w * fold, 8)
    assert torch.equal(record.values, q)
    assert torch.equal(record.scale, scale / fold.view(-1))
    assert torch.allclose(record.dequantize(), w, atol=float(scale.max()))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bits": 9}, r"`bits` must be in \[2, 8\]"),
        ({"values": torch.zeros(4, 6, dtype=torch.int32)}, "`values` must be an int8 tensor"),
        ({"scale": torch.ones(3)}, r"`scale` must be float32 \[4\]"),
        ({"scale": torch.ones(4, dtype=torch.float64)}, r"`scale` must be float32 \[4\]"),
        ({"bits": 2}, r"`values` must lie in \[-1, 1\] for 2 bits"),
    ],
)
def test_inconsistent_records_are_refused(change, match):
    good, _ = layer()
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(good, **change)


def test_the_container_maps_names_to_layers_and_refuses_duplicates():
    a, _ = layer("a.weight")
    b, _ = layer("b.weight", seed=1)
    record = CompressionRecord([a, b])
    assert list(record) == ["a.weight", "b.weight"] and record["b.weight"] is b
    assert len(record) == 2 and "a.weight" in record and record.get("c.weight") is None
    assert "2 layers" in repr(record)
    assert not CompressionRecord(())
    with pytest.raises(ValueError, match=r"two records for 'a\.weight'"):
        CompressionRecord([a, a])


def test_names_relative_to_a_submodule():
    root = nn.Module()
    root.net = nn.Sequential(nn.Linear(6, 4))
    root.head = nn.Linear(4, 2)
    inner, _ = layer("net.0.weight")
    outer, _ = layer("head.weight")
    record = CompressionRecord([inner, outer], root=root)
    assert record.relative_to(root) is record
    sub = record.relative_to(root.net)
    assert list(sub) == ["0.weight"] and sub.root is root.net
    assert torch.equal(sub["0.weight"].values, inner.values)
    assert CompressionRecord([inner]).relative_to(root.net)  # no root: names are the model's
    with pytest.raises(ValueError, match="`model` is not part of"):
        record.relative_to(nn.Linear(6, 4))


def test_activation_range_and_record_source():
    act = ActivationRange(scale=0.1, zero_point=3, bits=8)
    assert act.qmax == 255
    record, _ = layer()
    with_act = dataclasses.replace(record, activation=act)
    assert with_act.activation is act

    class Holder:
        def __init__(self, record):
            self.record = record

    assert isinstance(Holder(CompressionRecord([record])), RecordSource)
    assert not isinstance(object(), RecordSource)


def test_a_shared_layer_dequantizes_through_its_group_codebook_and_mask():
    from lightning_compress.quantization import SharedLayer

    codebook = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    indices = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.uint8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    layer = SharedLayer("fc.weight", codebook, indices, mask, bits=1)
    want = torch.tensor([[-1.0, 2, 0], [2, -1, -1], [3, 0, -4], [0, -4, 3]])
    assert layer.groups == 2
    torch.testing.assert_close(layer.dequantize(), want)


@pytest.mark.parametrize(
    ("codebook", "indices", "bits", "match"),
    [
        (torch.zeros(1, 4), torch.zeros(2, 3, dtype=torch.uint8), 9, "`bits` must be in"),
        (torch.zeros(1, 2), torch.full((2, 3), 2, dtype=torch.uint8), 1, "point past"),
        (torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.uint8), 1, "groups dividing"),
        (torch.zeros(1, 4), torch.zeros(2, 3, dtype=torch.int8), 2, "uint8"),
    ],
)
def test_a_shared_layer_refuses_what_is_not_one_shared_weight(codebook, indices, bits, match):
    from lightning_compress.quantization import SharedLayer

    mask = torch.ones(indices.shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        SharedLayer("fc.weight", codebook, indices, mask, bits=bits)
