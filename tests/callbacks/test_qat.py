import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.clock import Step
from lightning_compress.export import pack, read
from lightning_compress.quantization import QuantizedLayer, quantize_weight, weight_qmax
from lightning_compress.quantization.layers import conv_bn_pairs
from lightning_compress.zoo import BNConvNet

from ..helpers import TinyMLP, TinyTransformer, make_trainer, random_classification

WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]


def fit(tmp_path, callbacks, model=None, **kwargs):
    model = model or TinyMLP()
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return model, trainer


class TinyBNConv(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = BNConvNet(input_shape=(1, 8, 8), num_classes=4, width=4)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x.view(-1, 1, 8, 4).repeat(1, 1, 1, 2)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(random_classification(), batch_size=8)


# -- misconfiguration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, r"`bits` must be an integer in \[2, 8\], got 9"),
        ({"start": "2ep", "freeze_bn": "1ep"}, "`freeze_bn`=1ep is before"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    # Every rule is QATConfig's (tests/quantization/test_config.py); the callback builds one.
    with pytest.raises(ValueError, match=match):
        QATCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({}, "QATCallback{'bits': 8, 'include': None, 'exclude': None}"),
        (
            {"bits": 4, "include": ["fc*"], "exclude": "fc3", "start": "1ep", "lsq_lr": 0.1},
            "QATCallback{'bits': 4, 'include': ['fc*'], 'exclude': 'fc3'}",
        ),
        ({"include": ("a", "b")}, "QATCallback{'bits': 8, 'include': ('a', 'b'), 'exclude': None}"),
    ],
)
def test_state_key_is_the_one_old_checkpoints_hold(kwargs, key):
    assert QATCallback(**kwargs).state_key == key


def test_settings_are_the_validated_config():
    qat = QATCallback(start="2ep", activations=0, freeze_bn=10, overrides={"fc3": 8})
    assert qat.config.start == Step(2, "ep") and qat.start == Step(2, "ep")
    assert qat.activations is None and qat.freeze_bn == Step(10, "it")
    assert qat.overrides == {"fc3": 8} and qat.freeze_observers is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fold_bn": True}, "no Conv followed by a BatchNorm"),
        ({"include": ["conv9"]}, "`include` pattern 'conv9' matches no module"),
        ({"overrides": {"head": 4}}, "`overrides` pattern 'head' matches none"),
        (
            {"start": "1ep", "freeze_observers": "3it"},
            r"`freeze_observers`=3it \(3 steps\) is before",
        ),
    ],
)
def test_bad_targeting_raises_before_the_first_step(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [QATCallback(**kwargs)], max_steps=1)


# -- what the model computes ---------------------------------------------------------------


def test_forward_uses_per_channel_symmetric_fake_quantized_weights(tmp_path):
    qat = QATCallback(bits=4, activations=None)
    model, _ = fit(tmp_path, [qat], max_epochs=1)
    x = torch.randn(5, 32)
    qat.layers.install()  # teardown removed the hooks; put them back to compare
    qat.layers.enabled = True
    fake = model(x)
    qat.layers.remove()
    manual = x
    for i, name in enumerate(WEIGHTS):
        layer = model.get_submodule(name.split(".")[0])
        w = layer.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / weight_qmax(4)
        wq = torch.clamp(torch.round(w / scale), -7, 7) * scale
        manual = F.linear(manual, wq, layer.bias)
        manual = torch.relu(manual) if i < 2 else manual
    assert torch.allclose(fake, manual, atol=1e-5)
    assert not torch.allclose(model(x), manual, atol=1e-4)  # the plain model is back


def test_converted_integers_reproduce_the_fake_quantized_model(tmp_path):
    qat = QATCallback(bits=8, activations=None)
    model, _ = fit(tmp_path, [qat], max_epochs=2)
    assert set(qat.record) == set(WEIGHTS)  # converted at the end of fit
    x = torch.randn(7, 32)
    qat.layers.install()
    qat.layers.enabled = True
    fake = model(x).detach()
    qat.layers.remove()
    dequant = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in qat.record.items():
            assert isinstance(layer, QuantizedLayer) and layer.values.dtype == torch.int8
            weight = layer.dequantize()
            step = layer.scale[:, None]
            original = model.get_parameter(name).detach()
            assert torch.all((weight - original).abs() <= step / 2 + 1e-7)  # within half a step
            dequant.get_parameter(name).copy_(weight)
    assert torch.allclose(dequant(x), fake, atol=1e-5)


def test_activation_observers_quantize_outputs_to_8_bits(tmp_path):
    qat = QATCallback(bits=8, activations=8)
    fit(tmp_path, [qat], max_epochs=2)
    for name, observer in qat.layers.observers.items():
        assert observer.initialized, name
        scale, zero = observer.qparams()
        assert observer.min <= 0 <= observer.max or scale > 0
        assert 0 <= zero <= 255
    out = qat.layers.observers["fc1"].fake_quant(torch.linspace(-3, 3, 1000))
    assert len(torch.unique(out)) <= 256


def _quantized_mlp_forward(model, record, x):
    """TinyMLP computed from the record alone: dequantized weights, int8 hidden activations,
    float logits (the last layer's output is left float by default)."""
    for name in ("fc1", "fc2", "fc3"):
        layer = record[f"{name}.weight"]
        weight = layer.values.float() * layer.scale[:, None]
        x = torch.nn.functional.linear(x, weight, getattr(model, name).bias)
        if name != "fc3":
            act = layer.activation
            x = torch.fake_quantize_per_tensor_affine(x, act.scale, act.zero_point, 0, act.qmax)
            x = torch.relu(x)
        else:
            assert layer.activation is None
    return x


def test_after_fit_the_module_is_the_quantized_model_until_removed(tmp_path):
    plain = TinyMLP()
    qat = QATCallback()
    model, _ = fit(tmp_path, [qat], max_epochs=1)
    assert list(model.state_dict()) == list(plain.state_dict())  # names untouched
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        quantized = model.eval()(x)
        assert torch.allclose(quantized, _quantized_mlp_forward(plain, qat.record, x), atol=1e-5)
        assert not torch.allclose(quantized, plain(x), atol=1e-4)
        qat.remove(model)
        assert torch.equal(model(x), plain(x))  # the float network again


def test_remove_refuses_another_module_and_a_copy_fails_loudly(tmp_path):
    qat = QATCallback()
    model, _ = fit(tmp_path, [qat], max_epochs=1)
    with pytest.raises(ValueError, match="quantizes another module"):
        qat.remove(TinyMLP())
    with pytest.raises(RuntimeError, match=r"copy of a model.*qat.remove\(model\)"):
        copy.deepcopy(model)(torch.randn(2, 32))


def test_test_with_ckpt_path_and_a_second_fit_after_quantized_fit(tmp_path):
    qat = QATCallback()
    model = TinyMLP()
    trainer = make_trainer(
        tmp_path,
        [qat, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        max_epochs=2,
        enable_checkpointing=True,
        limit_val_batches=2,
    )
    trainer.fit(model)
    x = torch.randn(4, 32)
    with torch.no_grad():
        after_fit = model.eval()(x)
    trainer.test(model, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), after_fit)
    second = make_trainer(tmp_path, [qat], max_epochs=3)
    second.fit(model)
    assert second.global_step > 0 and qat.layers.enabled
    fresh_qat, fresh = QATCallback(), TinyMLP()
    make_trainer(tmp_path, [fresh_qat]).test(
        fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False
    )
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), after_fit)


def test_keyword_forward_attention_bn_and_dict_batches(tmp_path):
    qat = QATCallback(bits=8)
    model = TinyTransformer()
    trainer = make_trainer(tmp_path, [qat], max_epochs=2)
    trainer.fit(model)
    assert "encoder.self_attn.in_proj_weight" in qat.targets
    assert qat.layers.observers["encoder.self_attn"].initialized


class FastPathProbe(pl.Callback):
    """Records the attention fast-path flag while the model trains and validates."""

    def __init__(self):
        self.seen = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.add(torch.backends.mha.get_fastpath_enabled())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.add(torch.backends.mha.get_fastpath_enabled())


@pytest.mark.parametrize("before", [True, False])
def test_attention_fast_path_is_off_while_quantizing_and_restored_after(tmp_path, before):
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(before)
    try:
        probe, qat = FastPathProbe(), QATCallback(bits=8)
        trainer = make_trainer(tmp_path, [qat, probe], max_epochs=1)
        trainer.fit(TinyTransformer())
        assert probe.seen == {False}  # the hooks must see every attention call
        # Still quantized after fit, so still off; the process gets its flag back on remove.
        assert torch.backends.mha.get_fastpath_enabled() is False
        qat.remove()
        assert torch.backends.mha.get_fastpath_enabled() is before
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# -- with pruning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["prune-first", "qat-first"])
def test_pruned_weights_quantize_to_exact_zero_in_either_order(tmp_path, order):
    prune = PruneCallback(sparsity=0.75, schedule="linear", start=0, end="2ep", every="4it")
    qat = QATCallback(bits=4, activations=8)
    callbacks = [prune, qat] if order == "prune-first" else [qat, prune]
    model, _ = fit(tmp_path, callbacks, max_epochs=3)
    for name in WEIGHTS:
        keep = prune.masks.keep_mask(name)
        layer = qat.record[name]
        assert torch.all(layer.values[~keep] == 0), name
        survivors = model.get_parameter(name).detach().abs() * keep
        expected = survivors.amax(dim=1).clamp_min(1e-12) / weight_qmax(4)
        assert torch.allclose(layer.scale, expected), name
        fake = qat.layers.quantized_weight(name.split(".")[0], "weight")
        assert torch.all(fake[~keep] == 0)


# -- BatchNorm folding ---------------------------------------------------------------------------


def test_conv_bn_pairs_are_folded_and_converted_with_their_factor(tmp_path):
    module = TinyBNConv()
    assert conv_bn_pairs(module) == {"net.conv1": "net.bn1", "net.conv2": "net.bn2"}
    qat = QATCallback(bits=8, activations=None, fold_bn=True, freeze_bn="1ep")
    trainer = make_trainer(tmp_path, [qat], max_epochs=2)
    trainer.fit(module)
    layer = qat.record["net.conv1.weight"]
    bn = module.net.bn1
    fold = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = module.net.conv1.weight.detach() * fold.view(-1, 1, 1, 1)
    q, scale = quantize_weight(folded, 8)
    # The integers are the folded layer's; the scale has the fold divided out again.
    assert torch.equal(layer.values, q) and torch.allclose(layer.scale, scale / fold)


def test_freeze_bn_stops_running_statistics(tmp_path):
    class Snap(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            self.__dict__.setdefault("means", []).append(pl_module.net.bn1.running_mean.clone())

    snap = Snap()
    fit(tmp_path, [QATCallback(freeze_bn="1ep"), snap], model=TinyBNConv(), max_epochs=3)
    assert torch.count_nonzero(snap.means[0]) > 0  # epoch 0 updated the statistics
    assert torch.equal(snap.means[0], snap.means[1]) and torch.equal(snap.means[1], snap.means[2])


# -- checkpoints, test after QAT, fit twice ---------------------------------------------------


def test_test_from_checkpoint_and_fit_twice(tmp_path):
    qat = QATCallback(bits=8)
    model = TinyMLP()
    trainer = make_trainer(tmp_path, [qat], max_epochs=2, limit_val_batches=1)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    state = torch.load(tmp_path / "qat.ckpt", weights_only=True)["callbacks"][qat.state_key]
    assert state["enabled"] and set(state["observers"]) == {"fc1", "fc2", "fc3"}
    fresh_qat = QATCallback(bits=8)
    tester = make_trainer(tmp_path, [fresh_qat], limit_test_batches=1)
    (result,) = tester.test(TinyMLP(), ckpt_path=tmp_path / "qat.ckpt", verbose=False)
    assert "test_loss" in result
    assert fresh_qat.layers.enabled
    assert float(fresh_qat.layers.observers["fc1"].max) == pytest.approx(
        float(state["observers"]["fc1"]["max"])
    )
    again = make_trainer(tmp_path, [qat], max_epochs=1)
    again.fit(model)  # a second fit on the same callback and model
    assert qat.record


def _resume_run(tmp_path, stop=None, ckpt=None):
    pl.seed_everything(5)
    model = TinyMLP()
    qat = QATCallback(bits=4, start="1ep", freeze_observers="3ep")
    trainer = make_trainer(tmp_path, [qat], max_epochs=stop or 4)
    trainer.fit(model, ckpt_path=ckpt)
    return model, qat, trainer


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full_model, full_qat, _ = _resume_run(tmp_path / "full")
    _, _, half = _resume_run(tmp_path / "half", stop=2)
    half.save_checkpoint(tmp_path / "mid.ckpt")
    model, qat, _ = _resume_run(tmp_path / "resumed", ckpt=tmp_path / "mid.ckpt")
    for name in full_qat.layers.observers:
        a, b = full_qat.layers.observers[name], qat.layers.observers[name]
        assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max), name
    for (name, a), (_, b) in zip(
        full_model.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_int4_weights_pack_two_per_byte(tmp_path):
    qat = QATCallback(bits=4, overrides={"fc3": 8}, activations=None)
    model, _ = fit(tmp_path, [qat], max_epochs=1)
    fc1, fc3 = qat.record["fc1.weight"], qat.record["fc3.weight"]
    assert fc1.bits == 4 and fc1.values.dtype == torch.int8 and int(fc1.values.abs().max()) <= 7
    assert fc3.bits == 8 and fc3.values.shape == (4, 16)
    art = read(pack(model, tmp_path / "m.safetensors", qat=qat))
    assert art.tensors["packed/fc1/qweight"].numel() == 32 * 32 // 2
    assert art.tensors["packed/fc3/qweight"].dtype == torch.int8


# -- learned step sizes ----------------------------------------------------------------------------


def test_lsq_learns_steps_and_converts_with_them(tmp_path):
    pl.seed_everything(0)
    model = TinyMLP()
    w0 = model.fc1.weight.detach().clone()
    qat = QATCallback(bits=4, method="lsq", activations=None, lsq_lr=1e-2)
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start=0, include=["fc1"])
    fit(tmp_path, [prune, qat], model=model, max_epochs=2)
    steps = qat.layers.steps
    assert set(steps) == set(WEIGHTS)
    keep = prune.masks.keep_mask("fc1.weight")
    init = 2 * (w0 * keep).abs().sum(1) / keep.sum(1) / 7**0.5
    # Initialised from the surviving weights at the first step, then learned.
    assert not torch.allclose(steps["fc1.weight"].detach(), init, atol=1e-4)
    layer = qat.record["fc1.weight"]
    assert torch.allclose(layer.scale, steps["fc1.weight"].detach())
    assert torch.all(layer.values[~keep] == 0)
    fake = qat.layers.quantized_weight("fc1", "weight").detach()
    assert torch.allclose(layer.dequantize(), fake, atol=1e-6)


def test_lsq_steps_resume_exactly(tmp_path):
    def run(path, stop=None, ckpt=None):
        pl.seed_everything(3)
        model = TinyMLP()
        qat = QATCallback(bits=4, method="lsq", start="1ep")
        trainer = make_trainer(path, [qat], max_epochs=stop or 4)
        trainer.fit(model, ckpt_path=ckpt)
        return model, qat, trainer

    full_model, full_qat, _ = run(tmp_path / "full")
    _, half_qat, half = run(tmp_path / "half", stop=2)
    half.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"][half_qat.state_key]
    assert set(state["steps"]) == set(WEIGHTS)
    model, qat, _ = run(tmp_path / "resumed", ckpt=tmp_path / "mid.ckpt")
    for name in WEIGHTS:
        assert torch.allclose(qat.layers.steps[name], full_qat.layers.steps[name], atol=1e-7)
    for a, b in zip(full_model.parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_logs_bits_scales_and_clipped_fraction(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, [QATCallback(bits=4, overrides={"fc3": 8})], max_epochs=2, logger=logger)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for key in ("qat/bits/fc1.weight", "qat/scale_mean/fc1.weight", "qat/clipped/fc3.weight"):
        assert key in header
    rows = [dict(zip(header, line.split(","), strict=False)) for line in text.splitlines()[1:]]
    bits = [float(r["qat/bits/fc3.weight"]) for r in rows if r.get("qat/bits/fc3.weight")]
    clipped = [float(r["qat/clipped/fc1.weight"]) for r in rows if r.get("qat/clipped/fc1.weight")]
    assert bits and set(bits) == {8.0}
    assert clipped and set(clipped) == {0.0}  # range-based scales never clip


def _test_loss(model, hooks=None):
    """Mean per-batch loss over the test loader (equal batches), as Lightning logs it."""
    if hooks is not None:
        hooks.install()
    try:
        with torch.no_grad():
            losses = [F.cross_entropy(model(x), y) for x, y in model.test_dataloader()]
            return float(torch.stack(losses).mean())
    finally:
        if hooks is not None:
            hooks.remove()


def test_testing_after_fit_evaluates_the_fake_quantized_model(tmp_path):
    qat = QATCallback(bits=4, activations=8)
    model, trainer = fit(tmp_path, [qat], max_epochs=2)
    trained_layers = qat.layers
    (result,) = trainer.test(model, verbose=False, dataloaders=model.test_dataloader())
    assert qat.layers is trained_layers  # the same observers and phase, not fresh ones
    model.eval()
    expected = _test_loss(model, qat.layers)
    assert result["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - _test_loss(model)) > 1e-4  # float weights would score differently


@pytest.mark.parametrize("method", ["ste", "lsq"])
def test_attach_rebuilds_the_integers_from_a_checkpoint(tmp_path, method):
    qat = QATCallback(bits=8, activations=8, method=method)
    _, trainer = fit(tmp_path, [qat], max_epochs=2)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=True)
    restored = TinyMLP()
    restored.load_state_dict(ckpt["state_dict"])
    plain = _test_loss(restored)
    again = QATCallback(bits=8, activations=8, method=method)
    assert again.attach(restored, ckpt["callbacks"][again.state_key]) is again
    assert again.record.keys() == qat.record.keys()
    for name, layer in qat.record.items():
        assert torch.equal(layer.values, again.record[name].values), name
        assert torch.equal(layer.scale, again.record[name].scale), name
        assert layer.activation == again.record[name].activation, name
    for name, observer in qat.layers.observers.items():
        assert again.layers.observers[name].qparams() == observer.qparams()
    assert _test_loss(restored) == plain  # no hooks left behind
