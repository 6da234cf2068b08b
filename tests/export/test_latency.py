"""Implementations of packed layers, the latency table, and load_into(batch_size=...)."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_compress.export import load_into, pack
from lightning_compress.export.latency import LatencyTable, machine
from lightning_compress.export.modules import (
    IMPLEMENTATIONS,
    PackedConv2d,
    PackedLinear,
    PackedWeight,
    conv_params,
    implementations,
)
from lightning_compress.ops.dyn_linear import quantize_rows
from lightning_compress.zoo import LeNet5, LeNet300100

from .test_pack import pruned


def layer_parts(n=24, k=40, sparsity=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q[torch.rand(n, k, generator=g) < sparsity] = 0
    return q, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)


def dyn_tolerance(x, q, scale):
    """Half a quantization step of every input, through the layer's absolute weights."""
    step = quantize_rows(x.reshape(-1, x.shape[-1]))[1]
    return float((0.5 * step.max() * (q.abs().float().sum(dim=1) * scale).max()).item()) + 1e-4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("sparse", [False, True])
def test_every_linear_implementation_computes_the_layer(impl, sparse):
    q, scale, bias = layer_parts()
    x = torch.randn(3, 5, 40)
    kernel = PackedLinear(q, scale, bias, 8, sparse)
    other = PackedLinear(q, scale, bias, 8, sparse, impl=impl)
    assert (other.impl == impl and f"impl={impl}" in repr(other)) or impl == "kernel"
    y, ref = other(x), kernel(x)
    assert y.shape == (3, 5, 24)
    if impl in ("kernel", "fp32"):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        tol = dyn_tolerance(x, q, scale) * (2 if impl == "qdynamic" else 1)  # 7-bit inputs
        assert float((y - ref).abs().max()) <= tol


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_conv_implementation_computes_the_layer(impl):
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    q, scale, bias = layer_parts(8, 27)
    kernel = PackedConv2d(q, scale, bias, 8, True, conv=conv_params(conv))
    other = PackedConv2d(q, scale, bias, 8, True, conv=conv_params(conv), impl=impl)
    x = torch.randn(2, 3, 9, 9)
    y, ref = other(x), kernel(x)
    assert y.shape == ref.shape == (2, 8, 5, 5)
    if impl in ("kernel", "fp32"):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other(x[0]), ref[0], rtol=1e-5, atol=1e-5)
    else:
        tol = 2 * dyn_tolerance(
            nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2), q, scale
        )
        assert float((y - ref).abs().max()) <= tol


def test_implementations_are_checked():
    q, scale, bias = layer_parts()
    with pytest.raises(ValueError, match="`impl` must be one of"):
        PackedWeight(q, scale, bias, 8, False, impl="magic")
    assert implementations(40, exact=True) == ("kernel", "fp32")
    assert "bitmask" not in implementations(70000)


def test_fake_quantized_outputs_survive_every_implementation():
    q, scale, bias = layer_parts()
    act = {"scale": 0.05, "zero_point": 10, "bits": 8}
    x = torch.randn(4, 40)
    for impl in IMPLEMENTATIONS:
        y = PackedLinear(q, scale, bias, 8, False, act, impl=impl)(x)
        levels = y / 0.05 + 10
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
        assert float(levels.min()) >= -1e-3


def fixed_table(fastest: str) -> LatencyTable:
    """A table whose every measurement already says ``fastest`` wins."""

    class Fixed(LatencyTable):
        def measure(self, layer, candidates, make_input):
            return {impl: (0.5 if impl == fastest else 1.0) for impl in candidates}

    return Fixed()


@pytest.mark.parametrize("fastest", ["fp32", "block", "bitmask", "kernel"])
def test_load_into_gives_each_layer_the_fastest_implementation(tmp_path, fastest):
    model = pruned(LeNet300100(), 0.8)
    path = pack(model, tmp_path / "a.safetensors")
    packed = load_into(copy.deepcopy(model), path, batch_size=4, latency=fixed_table(fastest))
    layers = [m for m in packed.modules() if hasattr(m, "latency_ms")]
    assert len(layers) == 3
    assert all(m.impl == fastest and m.latency_ms[fastest] == 0.5 for m in layers)
    # A layer fastest in fp32 is the plain layer again, holding the dequantized weight.
    want = nn.Linear if fastest == "fp32" else PackedLinear
    assert all(type(m) is want for m in layers)
    x = torch.randn(4, 1, 28, 28)
    default = load_into(copy.deepcopy(model), path)
    tol = 1e-4 if fastest in ("fp32", "kernel") else 0.05
    torch.testing.assert_close(packed(x), default(x), rtol=0, atol=tol)


def test_exact_keeps_fp32_activations(tmp_path):
    model = pruned(LeNet300100(), 0.5)
    path = pack(model, tmp_path / "a.safetensors")
    packed = load_into(
        copy.deepcopy(model), path, batch_size=2, exact=True, latency=LatencyTable(reps=1)
    )
    layers = [m for m in packed.modules() if hasattr(m, "latency_ms")]
    assert len(layers) == 3 and {m.impl for m in layers} <= {"kernel", "fp32"}
    assert all(set(m.latency_ms) == {"kernel", "fp32"} for m in layers)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(
        packed(x), load_into(copy.deepcopy(model), path)(x), rtol=1e-5, atol=1e-5
    )


def test_measured_choice_on_a_convnet_with_an_example(tmp_path):
    model = pruned(LeNet5(), 0.9)
    path = pack(model, tmp_path / "a.safetensors")
    x = torch.randn(3, 1, 28, 28)
    packed = load_into(
        copy.deepcopy(model), path, batch_size=3, example=x, latency=LatencyTable(reps=1)
    )
    chosen = {n: m for n, m in packed.named_modules() if hasattr(m, "latency_ms")}
    assert set(chosen) == {"conv1", "conv2", "fc1", "fc2"}
    for m in chosen.values():
        # fp32 (what the model ran before packing) stays unless another is >= 10% faster.
        best = min(m.latency_ms, key=m.latency_ms.get)
        faster = m.latency_ms[best] <= 0.9 * m.latency_ms["fp32"]
        assert m.impl == (best if faster else "fp32")
        in_features = m.weight[0].numel() if m.impl == "fp32" else m.in_features
        assert set(m.latency_ms) == set(implementations(in_features))
    assert packed(x).shape == (3, 10)


def test_bad_requests_leave_the_model_unchanged(tmp_path):
    model = pruned(LeNet5(), 0.5)
    path = pack(model, tmp_path / "a.safetensors")
    target = copy.deepcopy(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        load_into(target, path, batch_size=0)
    with pytest.raises(ValueError, match="pass `example`"):
        load_into(target, path, batch_size=2, latency=fixed_table("fp32"))
    with pytest.raises(ValueError, match="`example` does not run"):
        load_into(
            target, path, batch_size=2, example=torch.randn(2, 5), latency=fixed_table("fp32")
        )
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert not any(isinstance(m, PackedConv2d) for m in target.modules())


def test_the_table_is_cached_per_machine_and_ignores_foreign_files(tmp_path):
    path = tmp_path / "latency.json"
    built = []

    def candidate(name):
        def build():
            built.append(name)
            return nn.Identity()

        return build

    table = LatencyTable(path, reps=1)
    first = table.measure(
        "layer", {"a": candidate("a"), "b": candidate("b")}, lambda: torch.ones(2)
    )
    assert built == ["a", "b"] and set(first) == {"a", "b"}
    again = LatencyTable(path, reps=1).measure(
        "layer", {"a": candidate("a")}, lambda: torch.ones(2)
    )
    assert built == ["a", "b"] and again == {"a": first["a"]}  # read back, nothing rebuilt
    data = json.loads(path.read_text())
    assert data["machine"] == machine()
    data["machine"] = dict(data["machine"], cpu="another CPU")
    path.write_text(json.dumps(data))
    assert LatencyTable(path).entries == {}
    path.write_text("{not json")
    assert LatencyTable(path).entries == {}
