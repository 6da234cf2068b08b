import copy
import json
import struct

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import save, save_file
from torch import nn

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.export import ArtifactError, PackedLinear, load_into, pack, read, report
from lightning_compress.export import entropy as coder
from lightning_compress.export.artifact import FORMAT, FORMAT_VERSION, _shared_module, checksum
from lightning_compress.export.modules import SharedLinear
from lightning_compress.quantization import (
    ActivationRange,
    CompressionRecord,
    QuantizedLayer,
    SharedLayer,
)
from lightning_compress.zoo import LeNet5, LeNet300100

from ..helpers import TinyMLP, make_trainer
from .test_pack import assert_unchanged, fp32_bytes, pruned, snapshot

# Deep Compression's LeNet-300-100: the share of each layer's weights kept.
HAN_KEEP = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}


def kmeans(name, weight, bits, groups=1, iters=6, activation=None):
    """Weight sharing as Deep Compression does it: per group of consecutive output channels,
    k-means on the non-zero weights, centroids initialised linearly over their range."""
    w = weight.detach().float()
    rows = w.reshape(groups, -1)
    keep = rows != 0
    inf = torch.tensor(float("inf"))
    lo = torch.where(keep, rows, inf).amin(1, keepdim=True)
    hi = torch.where(keep, rows, -inf).amax(1, keepdim=True)
    c = lo + (hi - lo) * torch.linspace(0, 1, 2**bits)
    for _ in range(iters):
        a = (rows.unsqueeze(-1) - c.unsqueeze(1)).abs().argmin(-1)
        count = torch.zeros_like(c).scatter_add_(1, a, keep.float())
        sums = torch.zeros_like(c).scatter_add_(1, a, rows * keep)
        c = torch.where(count > 0, sums / count.clamp(min=1), c)
    indices = torch.where(keep, a, 0).to(torch.uint8)
    return SharedLayer(
        name, c.contiguous(), indices.reshape(w.shape), w != 0, bits, activation=activation
    )


def shared_record(model, bits=4, groups=None, only=None):
    """A record of every Linear/Conv2d of ``model`` (or those in ``only``), shared at ``bits``
    (a dict gives each layer its own), with ``groups`` codebooks per layer where given."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d) and (only is None or name in only):
            b = bits[name] if isinstance(bits, dict) else bits
            g = (groups or {}).get(name, 1)
            layers.append(kmeans(f"{name}.weight", m.weight, b, g))
    return CompressionRecord(layers)


def computing_with(model, record):
    """``model`` with each recorded weight replaced by the record's centroids."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in record.items():
            params[name].copy_(layer.dequantize())
    return ref


def han_pruned(model):
    with torch.no_grad():
        for name, keep in HAN_KEEP.items():
            w = getattr(model, name).weight
            cut = w.abs().flatten().kthvalue(int(w.numel() * (1 - keep))).values
            w[w.abs() <= cut] = 0
    return model.eval()


def test_lenet300_round_trip_computes_with_the_codebook_exactly(tmp_path):
    model = pruned(LeNet300100(), 0.9)
    record = shared_record(model, {"fc1": 4, "fc2": 4, "fc3": 5}, groups={"fc2": 4})
    path = pack(model, tmp_path / "s.safetensors", qat=record)
    art = read(path)
    assert art.version == FORMAT_VERSION == 3
    assert [(e["kind"], e["bits"], e["groups"], e["layout"]) for e in art.layers] == [
        ("shared", 4, 1, "sparse"),
        ("shared", 4, 4, "sparse"),
        ("shared", 5, 1, "sparse"),
    ]
    assert art.tensors["packed/fc2/codebook"].shape == (4, 16)
    loaded = load_into(copy.deepcopy(model), path)
    ref = computing_with(model, record)
    for name in ("fc1", "fc2", "fc3"):
        assert type(getattr(loaded, name)) is nn.Linear
        assert torch.equal(getattr(loaded, name).weight, record[f"{name}.weight"].dequantize())
        assert torch.equal(getattr(loaded, name).bias, getattr(model, name).bias)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
        assert torch.equal(loaded(x).argmax(1), ref(x).argmax(1))


def test_conv_layers_and_per_channel_codebooks_round_trip(tmp_path):
    model = pruned(LeNet5(), 0.8)
    groups = {"conv1": 20, "conv2": 5}  # conv1: one codebook per output channel
    record = shared_record(model, 3, groups=groups, only=("conv1", "conv2", "fc2"))
    path = pack(model, tmp_path / "c.safetensors", qat=record)
    conv1 = next(e for e in read(path).layers if e["name"] == "conv1")
    assert conv1["kind"] == "shared" and conv1["conv"]["kernel_size"] == [5, 5]
    loaded = load_into(copy.deepcopy(model), path)
    assert type(loaded.conv1) is nn.Conv2d and type(loaded.fc2) is nn.Linear
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)  # not in the record: fp32
    assert torch.equal(loaded.conv2.weight, record["conv2.weight"].dequantize())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), computing_with(model, record)(x))


def test_dense_layers_mixed_records_and_activation_ranges(tmp_path):
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    act = ActivationRange(scale=0.05, zero_point=100, bits=8)
    record = CompressionRecord(
        [
            kmeans("0.weight", model[0].weight, 2, activation=act),
            QuantizedLayer.from_weight("2.weight", model[2].weight, 8),
        ]
    )
    path = pack(model, tmp_path / "m.safetensors", qat=record)
    art = read(path)
    shared, integer = art.layers
    assert (shared["kind"], shared["layout"], shared["nnz"]) == ("shared", "dense", 96)
    assert "packed/0/unary" not in art.tensors and integer["kind"] == "linear"
    loaded = load_into(copy.deepcopy(model), path)
    assert isinstance(loaded[0], PackedLinear) and loaded[0].impl == "fp32"
    x = torch.randn(5, 12)
    ref = computing_with(nn.Sequential(model[0]), CompressionRecord([record["0.weight"]]))
    want = torch.fake_quantize_per_tensor_affine(ref(x), act.scale, act.zero_point, 0, 255)
    with torch.no_grad():
        assert torch.equal(loaded[0](x), want)  # the codebook's values, outputs on the grid
    lut = _shared_module(shared, art.tensors, model[0], impl="lut")
    with torch.no_grad():
        torch.testing.assert_close(lut(x), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="`impl` must be one of"):
        _shared_module(shared, art.tensors, model[0], impl="bitmask")


@pytest.mark.parametrize("impl", ["fp32", "lut"])
def test_load_into_times_both_implementations_of_a_shared_layer(tmp_path, impl):
    from .test_latency import fixed_table

    model = pruned(LeNet300100(), 0.9)
    record = shared_record(model, {"fc1": 4, "fc2": 4, "fc3": 5})
    path = pack(model, tmp_path / "s.safetensors", qat=record)
    loaded = load_into(copy.deepcopy(model), path, batch_size=3, latency=fixed_table(impl))
    layers = [loaded.fc1, loaded.fc2, loaded.fc3]
    assert all(m.impl == impl and set(m.latency_ms) == {"fp32", "lut"} for m in layers)
    assert all(type(m) is (nn.Linear if impl == "fp32" else SharedLinear) for m in layers)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():  # the codebook's exact values either way, to float summation order
        torch.testing.assert_close(loaded(x), computing_with(model, record)(x))
    assert "impl=lut" in repr(loaded) or impl == "fp32"


def test_a_shared_convolution_is_timed_only_in_fp32(tmp_path):
    from .test_latency import fixed_table

    model = pruned(LeNet5(), 0.8)
    record = shared_record(model, 3, only=("conv2",))
    path = pack(model, tmp_path / "c.safetensors", qat=record)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="pass `example`"):
        load_into(copy.deepcopy(model), path, batch_size=2, latency=fixed_table("lut"))
    loaded = load_into(
        copy.deepcopy(model), path, batch_size=2, example=x, latency=fixed_table("lut")
    )
    assert type(loaded.conv2) is nn.Conv2d and set(loaded.conv2.latency_ms) == {"fp32"}


def test_sharing_packs_smaller_than_uniform_int4_at_the_same_pruning(tmp_path):
    torch.manual_seed(0)
    model = han_pruned(LeNet300100())
    fp32 = fp32_bytes(model, tmp_path)
    int4 = pack(model, tmp_path / "int4.safetensors", bits=4)
    record = shared_record(model, {"fc1": 4, "fc2": 4, "fc3": 5})
    shared = pack(model, tmp_path / "shared.safetensors", qat=record)
    int4_bytes, shared_bytes = int4.stat().st_size, shared.stat().st_size
    assert shared_bytes < int4_bytes, (shared_bytes, int4_bytes)
    assert fp32 / shared_bytes > 1.05 * fp32 / int4_bytes > 35, (fp32, shared_bytes, int4_bytes)
    rep = report(shared)
    assert rep.file_bytes == shared_bytes
    by_name = {r.name: r for r in rep.layers}
    fc1 = by_name["fc1"]
    assert fc1.codebook == (1, 16) and by_name["fc3"].codebook == (1, 32)
    nnz = int(model.fc1.weight.count_nonzero())
    assert fc1.index_entropy <= fc1.index_bits < fc1.index_entropy + 0.1 + 8 * 40 / nnz
    stored = read(shared).tensors
    fc1_bits = 8 * sum(
        t.numel() * t.element_size() for k, t in stored.items() if k.startswith("packed/fc1/")
    )
    # Codebook, coded indices and positions; not the bias.
    assert fc1.bits_per_weight == pytest.approx((fc1_bits - 8 * 4 * 300) / (300 * 784))
    text = str(rep)
    assert "weight-sharing layers: 3" in text and "codebook 1 x 32" in text
    int4_fc1 = next(r for r in report(int4).layers if r.name == "fc1")
    assert fc1.bits_per_weight < int4_fc1.bits_per_weight


# -- bad input: a clear error, and the model untouched -----------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = pruned(LeNet300100(), 0.9)
    path = tmp_path_factory.mktemp("shared") / "good.safetensors"
    return pack(model, path, qat=shared_record(model, 2))


def rewritten(path, tmp_path, edit, name="bad"):
    """The artifact after ``edit(layers, tensors)``, signed again: only the layer's own checks
    can catch what ``edit`` broke."""
    art = read(path)
    layers, tensors = copy.deepcopy(art.layers), dict(art.tensors)
    edit(layers, tensors)
    layers_json = json.dumps(layers, separators=(",", ":"))
    unpacked_json = json.dumps([u.__dict__ for u in art.unpacked], separators=(",", ":"))
    metadata = {
        "format": FORMAT,
        "format_version": str(art.version),
        "layers": layers_json,
        "unpacked": unpacked_json,
        "checksum": checksum(layers_json, tensors, unpacked_json),
    }
    out = tmp_path / f"{name}.safetensors"
    out.write_bytes(save(tensors, metadata=metadata))
    return out


def rejects(path, match):
    model = pruned(LeNet300100(), 0.9)
    before = snapshot(model)
    with pytest.raises(ArtifactError, match=match):
        load_into(model, path)
    assert_unchanged(model, before)


def test_a_resigned_artifact_is_still_good(artifact, tmp_path):
    same = rewritten(artifact, tmp_path, lambda layers, tensors: None)
    x = torch.randn(3, 1, 28, 28)
    model = pruned(LeNet300100(), 0.9)
    with torch.no_grad():
        assert torch.equal(load_into(LeNet300100(), same)(x), load_into(model, artifact)(x))


def test_indices_past_the_codebook_are_rejected(artifact, tmp_path):
    def past(layers, tensors):
        nnz = layers[0]["nnz"]
        wrong = torch.randint(0, 4, (nnz,), dtype=torch.uint8)
        wrong[nnz // 2] = 9  # a 2-bit layer has 4 centroids
        tensors["packed/fc1/indices"] = coder.encode(wrong, 16)

    rejects(rewritten(artifact, tmp_path, past), r"'fc1' is corrupted: .*past the codebook")


def test_a_truncated_coded_stream_is_rejected(artifact, tmp_path):
    def cut(layers, tensors):
        tensors["packed/fc2/indices"] = tensors["packed/fc2/indices"][:-3].clone()

    rejects(rewritten(artifact, tmp_path, cut), r"'fc2' is corrupted: indices: .*truncated")


@pytest.mark.parametrize("offset", [0, 7, 30, -1])
def test_a_flipped_byte_in_the_coded_stream_is_rejected(artifact, tmp_path, offset):
    def flip(layers, tensors):
        stream = tensors["packed/fc1/indices"].clone()
        stream[offset] ^= 0x20
        tensors["packed/fc1/indices"] = stream

    rejects(rewritten(artifact, tmp_path, flip), r"'fc1' is corrupted: indices: .*(CRC|magic)")
    data = bytearray(artifact.read_bytes())  # unsigned, the artifact's checksum sees it first
    (header_len,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + header_len])["packed/fc1/indices"]
    data[8 + header_len + entry["data_offsets"][0] + offset % entry["data_offsets"][1]] ^= 0x20
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    rejects(bad, "checksum mismatch")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ls, ts: ls[1].update(groups=3), "groups do not divide"),
        (lambda ls, ts: ls[1].update(bits=3), "codebook is torch.float32 \\[1, 4\\]"),
        (lambda ls, ts: ls[1].update(bits=9), "unsupported index bits 9"),
        (lambda ls, ts: ls[1].update(nnz=ls[1]["nnz"] - 1), "holds \\d+ symbols, expected"),
        (lambda ls, ts: ls[1].update(layout="dense"), "do not fit a dense"),
        (
            lambda ls, ts: ts.update({"packed/fc2/codebook": ts["packed/fc2/codebook"].half()}),
            "codebook is torch.float16",
        ),
        (lambda ls, ts: ts.pop("packed/fc2/indices"), "corrupted"),
        (lambda ls, ts: ls[1].pop("conv", None) or ls[1].update(conv={}), "conv2d in the artifact"),
    ],
)
def test_a_corrupted_layer_table_or_codebook_is_rejected(artifact, tmp_path, edit, match):
    rejects(rewritten(artifact, tmp_path, edit), match)


def test_foreign_truncated_and_mismatched_artifacts_are_rejected(artifact, tmp_path):
    foreign = tmp_path / "plain.safetensors"
    save_file(dict(LeNet300100().state_dict()), foreign)
    rejects(foreign, "not a lightning-compress artifact")
    data = artifact.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    rejects(cut, "truncated|corrupted")
    model = LeNet300100(hidden=(200, 100))
    before = snapshot(model)
    with pytest.raises(ArtifactError, match="weight \\["):
        load_into(model, artifact)
    assert_unchanged(model, before)
    conv = nn.Module()
    conv.fc1 = nn.Conv2d(1, 300, 3)
    with pytest.raises(ArtifactError, match="weight-sharing linear in the artifact, Conv2d"):
        load_into(conv, artifact)


def test_a_record_of_the_wrong_shape_is_refused_at_pack(tmp_path):
    model = LeNet300100()
    layer = kmeans("fc1.weight", model.fc1.weight.t().contiguous(), 4)
    with pytest.raises(ValueError, match="the record's indices have shape"):
        pack(model, tmp_path / "x.safetensors", qat=CompressionRecord([layer]))


@pytest.mark.parametrize("activations", [None, 8])
def test_a_model_trained_with_kmeans_sharing_reloads_with_its_predictions(tmp_path, activations):
    pl.seed_everything(0)
    model = TinyMLP()
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start=0, scope="layer")
    qat = QATCallback(bits=2, scheme="kmeans", start=2, activations=activations)
    make_trainer(tmp_path, [prune, qat], max_steps=8).fit(model)
    assert {layer.kind for layer in qat.record.values()} == {"codebook"}
    x = torch.randn(16, 32)
    with torch.no_grad():
        trained = model(x)  # after fit the model computes with its codebooks
    path = pack(model, tmp_path / "k.safetensors", qat=qat)
    assert {e["kind"] for e in read(path).layers} == {"shared"}
    loaded = load_into(TinyMLP(), path)
    assert isinstance(loaded.fc1, nn.Linear if activations is None else PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, rtol=0, atol=1e-6)
        assert torch.equal(loaded(x).argmax(1), trained.argmax(1))


def test_conv1d_weights_share_in_their_canonical_order(tmp_path):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(24, 8), nn.ReLU(), conv1d(6, 24)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand(8, 24) < 0.5] = 0
    record = CompressionRecord(
        kmeans(f"{i}.weight", model[i].weight.t(), 3, groups=2)  # canonical (out, in)
        for i in (0, 2)
    )
    path = pack(model, tmp_path / "c1d.safetensors", qat=record)
    entry = read(path).layers[0]
    assert (entry["module"], entry["axes"], entry["shape"]) == ("Conv1D", [1, 0], [24, 8])
    loaded = load_into(copy.deepcopy(model), path)
    assert type(loaded[0]) is conv1d
    assert torch.equal(loaded[0].weight, record["0.weight"].dequantize().t())
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in record.items():
            ref.get_parameter(name).copy_(layer.dequantize().t())
        x = torch.randn(3, 5, 8)
        assert torch.equal(loaded(x), ref(x))
