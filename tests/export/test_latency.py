"""Implementations of packed layers, the latency table, and load_into(batch_size=...)."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_compress.export import load_into, pack
from lightning_compress.export.latency import LatencyTable, LayerSpec, machine, model_latency
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

    layer = LayerSpec("linear", 4, 2, 8, 0.5, input=(1, 2))
    table = LatencyTable(path, reps=1)
    first = table.measure(layer, {"a": candidate("a"), "b": candidate("b")}, lambda: torch.ones(2))
    assert built == ["a", "b"] and set(first) == {"a", "b"}
    again = LatencyTable(path, reps=1).measure(layer, {"a": candidate("a")}, lambda: torch.ones(2))
    assert built == ["a", "b"] and again == {"a": first["a"]}  # read back, nothing rebuilt
    data = json.loads(path.read_text())
    assert data["machine"] == machine()
    data["machine"] = dict(data["machine"], cpu="another CPU")
    path.write_text(json.dumps(data))
    assert LatencyTable(path).entries == {}
    path.write_text("{not json")
    assert LatencyTable(path).entries == {}


def test_a_layer_spec_survives_its_key():
    spec = LayerSpec("conv2d", 16, 150, 4, 0.25, True, (8, 6, 14, 14), '{"stride": 1}', True)
    assert LayerSpec.parse(spec.key()) == spec
    assert spec.rows == 8 * 6 * 14 and spec.size == 16 * 150
    assert LayerSpec.parse("not|a|key") is None


def linear(n, k, density, rows=1, bits=8):
    return LayerSpec("linear", n, k, bits, density, input=(rows, k))


def test_prediction_interpolates_density_size_and_rows():
    table = LatencyTable(predict=True)
    # A cost that is linear in density, in the weight's size and in the rows.
    for n, k in [(100, 100), (200, 400)]:
        for density in (0.1, 0.5, 1.0):
            for rows in (1, 8):
                ms = 0.01 + 1e-5 * n * k * density * (1 + rows / 8)
                table.entries[f"kernel|{linear(n, k, density, rows).key()}"] = ms

    def want(n, k, density, rows):
        return 0.01 + 1e-5 * n * k * density * (1 + rows / 8)

    assert table.predict("kernel", linear(100, 100, 0.5)) == pytest.approx(want(100, 100, 0.5, 1))
    # Between measured densities, then between measured sizes (another shape, same size too).
    assert table.predict("kernel", linear(100, 100, 0.3)) == pytest.approx(want(100, 100, 0.3, 1))
    mid = table.predict("kernel", linear(150, 200, 0.5))
    assert want(100, 100, 0.5, 1) < mid < want(200, 400, 0.5, 1)
    # Between measured rows; beyond the largest size, in proportion to the size.
    assert table.predict("kernel", linear(100, 100, 1.0, rows=4)) == pytest.approx(
        want(100, 100, 1.0, 4)
    )
    big = table.predict("kernel", linear(400, 400, 1.0))
    assert big == pytest.approx(want(200, 400, 1.0, 1) * 2)
    # Nothing of the family: other bits, another implementation, a convolution.
    assert table.predict("kernel", linear(100, 100, 0.5, bits=4)) is None
    assert table.predict("fp32", linear(100, 100, 0.5)) is None
    conv = LayerSpec("conv2d", 100, 100, 8, 0.5, input=(1, 4, 5, 5))
    assert table.predict("kernel", conv) is None


def test_a_predicting_table_measures_only_what_it_cannot_predict():
    table = LatencyTable(reps=1, predict=True)
    table.entries[f"kernel|{linear(8, 8, 0.5).key()}"] = 0.25
    table.entries[f"kernel|{linear(8, 8, 1.0).key()}"] = 0.5
    built = []

    def build(name):
        return lambda: built.append(name) or nn.Identity()

    times = table.measure(
        linear(8, 8, 0.75),
        {"kernel": build("kernel"), "fp32": build("fp32")},
        lambda: torch.ones(8),
    )
    assert times["kernel"] == pytest.approx(0.375) and built == ["fp32"]
    assert f"kernel|{linear(8, 8, 0.75).key()}" not in table.entries  # predictions are not stored


def test_calibrate_measures_a_grid_once_cold():
    table = LatencyTable(reps=1)
    specs = [LayerSpec("linear", 16, 32, 8, d, input=(1, 32), cold=True) for d in (0.25, 1.0)]
    built = []

    def build(impl, spec):
        built.append((impl, spec.density))
        return nn.Linear(32, 16)

    table.calibrate(specs, build, ["fp32", "kernel"])
    table.calibrate(specs, build, ["fp32", "kernel"])
    assert len(built) == 4 and len(table.entries) == 4
    assert all(v > 0 for v in table.entries.values())


def test_model_latency_sets_predictions_against_the_model_as_it_runs(tmp_path):
    model = pruned(LeNet300100(), 0.8)
    path = pack(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="no layer loaded by load_into"):
        model_latency(load_into(copy.deepcopy(model), path), torch.randn(2, 1, 28, 28))
    packed = load_into(copy.deepcopy(model), path, batch_size=2, latency=fixed_table("kernel"))
    packed.train()
    timed = model_latency(packed, torch.randn(2, 1, 28, 28), reps=3)
    assert [r.name for r in timed.layers] == ["fc1", "fc2", "fc3"]
    assert all(r.impl == "kernel" and r.predicted_ms == 0.5 for r in timed.layers)
    assert timed.predicted_ms == 1.5 and not timed.cold
    assert 0 < timed.packed_ms <= timed.measured_ms
    assert all(r.measured_ms > 0 for r in timed.layers)
    text = str(timed)
    assert "fc2" in text and "whole model" in text and "warm cache" in text
    assert all(m.training for m in packed.modules())  # modes restored


def test_report_gives_predicted_and_measured_latency_of_the_loaded_model(tmp_path):
    from lightning_compress.export import report

    model = pruned(LeNet300100(), 0.8)
    path = pack(model, tmp_path / "a.safetensors")
    packed = load_into(copy.deepcopy(model), path, batch_size=1, latency=fixed_table("bitmask"))
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="pass both `model` and `example`"):
        report(path, model=packed)
    plain = report(path)
    assert plain.latency is None and "predicted ms" not in str(plain)
    rep = report(path, model=packed, example=x, reps=3)
    assert [r.impl for r in rep.latency.layers] == ["bitmask"] * 3
    text = str(rep)
    assert "predicted ms" in text and "whole model" in text
    assert text.startswith(str(plain).splitlines()[0])
