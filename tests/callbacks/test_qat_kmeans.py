"""QATCallback(scheme="kmeans"): weight sharing with trained codebooks (Deep Compression)."""

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import DistillationCallback, PruneCallback, QATCallback, RewindCallback
from lightning_compress.quantization import SharedLayer
from lightning_compress.quantization.kmeans import SharedWeight, unpack_indices

from ..helpers import TinyMLP, make_trainer, offline_wandb
from .test_prune_ddp import run_two_ranks

WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]
DDP_SCRIPT = Path(__file__).with_name("ddp_qat_kmeans_script.py")


def fit(tmp_path, callbacks, model=None, **kwargs):
    model = model or TinyMLP()
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return model, trainer


def effective(qat, name):
    """The weight the forward computes with."""
    return qat.layers.quantized_weight(name.rpartition(".")[0], "weight").detach()


# -- misconfiguration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "kmeans", "bits": 0}, r"`bits` must be an integer in \[1, 8\], got 0"),
        ({"scheme": "kmeans", "bits": 9}, r"`bits` must be an integer in \[1, 8\], got 9"),
        ({"bits": 1}, r"`bits` must be an integer in \[2, 8\], got 1"),
        ({"scheme": "huffman"}, r"`scheme` must be one of \(.*\), got 'huffman'"),
        ({"scheme": "kmeans", "method": "lsq"}, "`method`='lsq' does not apply to scheme="),
        ({"scheme": "kmeans", "fold_bn": True}, "`fold_bn`=True is not supported"),
        ({"scheme": "kmeans", "groups": 0}, "`groups` must be an integer >= 1, got 0"),
        ({"scheme": "kmeans", "kmeans_lr": 0}, "`kmeans_lr` must be > 0"),
        ({"scheme": "kmeans", "refresh": 0}, "`refresh` must be a period > 0"),
        ({"groups": 2}, "`groups`=2 only applies to scheme='kmeans'"),
        ({"refresh": "1ep"}, "`refresh`='1ep' only applies to scheme='kmeans'"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": 3}, r"`groups`=3 must divide the output channels of fc1.weight \(32\)"),
        ({"bits": 7, "groups": 4}, "fc3.weight has 16 weights per codebook"),
    ],
)
def test_groups_and_codebook_sizes_that_cannot_fit_raise_in_setup(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [QATCallback(scheme="kmeans", **kwargs)], max_steps=1)


def test_more_centroids_than_surviving_weights_raises_at_start(tmp_path):
    # fc3 has 64 weights; 90% pruned leaves 6 or 7, fewer than 16 centroids.
    prune = PruneCallback(sparsity=0.9, schedule="oneshot", start=0, scope="layer")
    qat = QATCallback(bits=4, scheme="kmeans", start=2, include="fc3")
    with pytest.raises(ValueError, match=r"fc3.weight: 16 centroids \(4 bits\) need at least 16"):
        fit(tmp_path, [prune, qat], max_steps=4)


def test_state_key_names_the_scheme_only_when_not_uniform():
    assert QATCallback(bits=4).state_key == (
        "QATCallback{'bits': 4, 'include': None, 'exclude': None}"
    )
    assert QATCallback(bits=4, scheme="kmeans").state_key == (
        "QATCallback{'bits': 4, 'include': None, 'exclude': None, 'scheme': 'kmeans'}"
    )


# -- what the model computes ---------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "groups"), [(1, 1), (2, 1), (3, 4)])
def test_the_forward_computes_with_centroids_only(tmp_path, bits, groups):
    qat = QATCallback(bits=bits, scheme="kmeans", groups=groups, activations=None)
    model, _ = fit(tmp_path, [qat], max_epochs=1)
    x = torch.randn(5, 32)
    manual = x
    for name in WEIGHTS:
        w = effective(qat, name)
        for rows in w.view(groups, -1):  # each codebook's channels
            assert rows[rows != 0].unique().numel() <= 2**bits, name
        layer = model.get_submodule(name.split(".")[0])
        manual = torch.nn.functional.linear(manual, w, layer.bias)
        manual = torch.relu(manual) if name != "fc3.weight" else manual
    assert torch.allclose(model(x), manual, atol=1e-6)  # hooks are on after fit
    qat.remove()
    assert not torch.allclose(model(x), manual, atol=1e-4)  # float weights again


def test_linear_initialisation_and_exact_zeros_are_not_clustered():
    weight = torch.tensor([[0.0, -1.0, -0.9, 0.0], [0.1, 0.2, 1.0, 0.0]])
    shared = SharedWeight.cluster(weight, bits=2)
    # Linear init over [-1, 1] = -1, -1/3, 1/3, 1; Lloyd moves each to its members' mean.
    assert torch.allclose(shared.codebook.detach(), torch.tensor([[-0.95, -1 / 3, 0.15, 1.0]]))
    assert shared.indices.tolist() == [[0, 0, 0, 0], [2, 2, 3, 0]]
    out = shared(weight)
    assert torch.equal(out == 0, weight == 0)


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 5))
    with torch.no_grad():
        weight[0, :2] = 0  # pruned: no gradient, no centroid
    shared = SharedWeight.cluster(weight, bits=2, groups=2)
    x, g_out = torch.randn(7, 5), torch.randn(7, 6)
    torch.nn.functional.linear(x, shared(weight)).mul(g_out).sum().backward()
    # The gradient of the weight the forward used, taken on a plain leaf.
    w_eff = shared(weight).detach().requires_grad_(True)
    torch.nn.functional.linear(x, w_eff).mul(g_out).sum().backward()
    g = w_eff.grad * (weight.detach() != 0)
    expected = torch.zeros(2, 4)
    for r in range(6):
        for c in range(5):
            expected[r // 3, int(shared.indices[r, c])] += g[r, c]
    assert torch.allclose(shared.codebook.grad, expected, atol=1e-6)
    assert torch.allclose(weight.grad, g, atol=1e-6)  # straight through, zero at the zeros
    assert torch.all(weight.grad[0, :2] == 0)


def test_centroids_train_and_the_dense_weight_keeps_training(tmp_path):
    pl.seed_everything(0)
    model = TinyMLP()
    qat = QATCallback(bits=2, scheme="kmeans", activations=None, kmeans_lr=1e-2)
    w0 = model.fc1.weight.detach().clone()
    fit(tmp_path, [qat], model=model, max_epochs=2)
    initial = SharedWeight.cluster(w0, bits=2).codebook.detach()
    assert not torch.allclose(qat.layers.shared["fc1.weight"].codebook.detach(), initial)
    assert not torch.allclose(model.fc1.weight.detach(), w0)


def test_refresh_reassigns_weights_on_the_clock(tmp_path):
    pl.seed_everything(0)
    qat = QATCallback(bits=2, scheme="kmeans", activations=None, refresh="4it")
    never = QATCallback(bits=2, scheme="kmeans", activations=None, include="fc1")
    model = TinyMLP(lr=0.5)  # large steps: weights cross the cluster boundaries
    fit(tmp_path, [qat], model=model, max_epochs=2)
    assert qat.reassigned and qat.reassigned["fc1.weight"] > 0
    assert qat._last_refresh == 12  # 8 steps per epoch: refreshed at 4, 8, 12 (start 0)
    shared = qat.layers.shared["fc1.weight"]
    nearest = (model.fc1.weight.detach()[..., None] - shared.codebook.detach()[0]).abs()
    # Assignments are the nearest centroid as of the last refresh, not of the final weights.
    assert not torch.equal(shared.indices.long(), nearest.argmin(-1))
    pl.seed_everything(0)
    fit(tmp_path, [never], model=TinyMLP(lr=0.5), max_epochs=2)
    assert never.reassigned == {}


def test_clustering_sets_each_weight_to_its_centroid(tmp_path):
    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            if trainer.global_step == 4:  # clustered at the start of this step
                self.weight = module.fc1.weight.detach().clone()
                codebook = trainer.callbacks[0].layers.shared["fc1.weight"].codebook
                self.clustered = codebook.detach().flatten().tolist()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            if trainer.global_step == 4 and not hasattr(self, "after"):
                self.after = module.fc1.weight.detach().clone()

    pl.seed_everything(0)
    qat = QATCallback(bits=2, scheme="kmeans", activations=None, start="4it")
    snap = Snapshot()
    fit(tmp_path, [qat, snap], max_epochs=1)
    # Right after clustering the dense weight is its centroid; one step later it has moved on.
    assert set(snap.weight.unique().tolist()) - {0.0} <= set(snap.clustered)
    assert len(set(snap.after.unique().tolist())) > 4


def test_a_refresh_that_scatters_the_clusters_warns(tmp_path):
    pl.seed_everything(0)
    qat = QATCallback(bits=3, scheme="kmeans", activations=None, refresh="1ep")
    with pytest.warns(UserWarning, match="scatters the clusters"):
        fit(tmp_path, [qat], model=TinyMLP(lr=2.0), max_epochs=3)
    assert max(qat.reassigned.values()) > 0.1
    pl.seed_everything(0)
    calm = QATCallback(bits=3, scheme="kmeans", activations=None, refresh="2it")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*scatters the clusters")
        fit(tmp_path, [calm], model=TinyMLP(lr=0.01), max_epochs=1)


# -- with pruning, distillation, rewinding -----------------------------------------------------


@pytest.mark.parametrize("order", ["prune-first", "qat-first"])
def test_pruned_weights_stay_exact_zeros_in_either_order(tmp_path, order):
    # Pruning starts after clustering (at 1ep) and continues: weights leave the codebook later.
    prune = PruneCallback(sparsity=0.75, schedule="linear", start="1ep", end="2ep", every="4it")
    qat = QATCallback(bits=2, scheme="kmeans", activations=8)
    callbacks = [prune, qat] if order == "prune-first" else [qat, prune]
    fit(tmp_path, callbacks, max_epochs=3)
    for name in WEIGHTS:
        keep = prune.masks.keep_mask(name)
        assert not keep.all()
        assert torch.all(effective(qat, name)[~keep] == 0), name
        assert torch.all(effective(qat, name)[keep] != 0), name
        layer = qat.record[name]
        assert torch.equal(layer.mask, keep) and torch.all(layer.indices[~keep] == 0)


def test_composes_with_distillation_and_rewinding(tmp_path):
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep")
    qat = QATCallback(bits=3, scheme="kmeans", start="1ep")
    rewind = RewindCallback(to="1ep", mode="weights")
    distill = DistillationCallback(teacher, temperature=2.0)
    fit(tmp_path, [rewind, qat, distill, prune], max_epochs=3)
    assert set(qat.layers.shared) == set(WEIGHTS)  # the teacher is never a target
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_state.items())
    for name in WEIGHTS:
        keep = prune.masks.keep_mask(name)
        w = effective(qat, name)
        assert torch.all(w[~keep] == 0) and w[keep].unique().numel() <= 8


# -- export record -------------------------------------------------------------------------------


def test_record_dequantizes_to_the_weight_the_model_computed_with(tmp_path):
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start=0)
    qat = QATCallback(bits=3, scheme="kmeans", groups=4, activations=8, overrides={"fc3": 2})
    fit(tmp_path, [prune, qat], max_epochs=2)
    assert set(qat.record) == set(WEIGHTS)
    for name in WEIGHTS:
        layer = qat.record[name]
        assert isinstance(layer, SharedLayer) and layer.groups == 4
        assert layer.bits == (2 if name == "fc3.weight" else 3)
        assert torch.equal(layer.dequantize(), effective(qat, name)), name
    assert qat.record["fc1.weight"].activation is not None
    assert qat.record["fc3.weight"].activation is None  # the logits stay float


def test_attach_rebuilds_the_records_from_a_checkpoint(tmp_path):
    qat = QATCallback(bits=2, scheme="kmeans", activations=None)
    _, trainer = fit(tmp_path, [qat], max_epochs=2)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=True)
    restored = TinyMLP()
    restored.load_state_dict(ckpt["state_dict"])
    again = QATCallback(bits=2, scheme="kmeans", activations=None)
    again.attach(restored, ckpt["callbacks"][again.state_key])
    for name, layer in qat.record.items():
        assert torch.equal(layer.codebook, again.record[name].codebook), name
        assert torch.equal(layer.indices, again.record[name].indices), name


# -- checkpoint, resume, DDP ---------------------------------------------------------------------


def _resume_run(path, stop=None, ckpt=None):
    pl.seed_everything(5)
    model = TinyMLP()
    prune = PruneCallback(sparsity=0.5, schedule="linear", start="1ep", end="3ep", every="4it")
    qat = QATCallback(bits=3, scheme="kmeans", start="1ep", refresh="6it", kmeans_lr=1e-2)
    trainer = make_trainer(path, [prune, qat], max_epochs=stop or 4)
    trainer.fit(model, ckpt_path=ckpt)
    return model, qat, trainer


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full_model, full_qat, _ = _resume_run(tmp_path / "full")
    _, half_qat, half = _resume_run(tmp_path / "half", stop=2)
    half.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"][half_qat.state_key]
    packed = state["shared"]["fc1.weight"]["indices"]
    assert packed.dtype == torch.uint8 and packed.numel() == 32 * 32 * 3 // 8  # 3 bits an index
    assert torch.equal(
        unpack_indices(packed, 3, (32, 32)), half_qat.layers.shared["fc1.weight"].indices
    )
    assert {"codebook_optimizer", "last_refresh"} <= set(state)
    model, qat, _ = _resume_run(tmp_path / "resumed", ckpt=tmp_path / "mid.ckpt")
    for name in WEIGHTS:
        a, b = full_qat.layers.shared[name], qat.layers.shared[name]
        assert torch.equal(a.codebook, b.codebook), name
        assert torch.equal(a.indices, b.indices), name
    for (name, a), (_, b) in zip(
        full_model.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_codebooks_and_assignments_identical_across_two_cpu_processes(tmp_path):
    records = run_two_ranks(tmp_path, "kmeans", script=DDP_SCRIPT)
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["codebooks"] == records[1]["codebooks"]
    assert records[0]["indices"] == records[1]["indices"]
    assert records[0]["weights"] == records[1]["weights"]
    assert records[0]["codebooks"] != records[0]["initial_codebooks"]  # the centroids trained
    assert records[0]["refreshes"] > 0


# -- logging -------------------------------------------------------------------------------------


def test_logs_centroids_and_reassigned_fraction(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    qat = QATCallback(bits=2, scheme="kmeans", refresh="4it", overrides={"fc3": 5})
    fit(tmp_path, [qat], max_epochs=2, logger=logger)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for key in (
        "qat/centroid/fc1.weight/0",
        "qat/centroid/fc1.weight/3",
        "qat/centroid_min/fc3.weight",
        "qat/centroid_max/fc3.weight",
        "qat/reassigned/fc2.weight",
    ):
        assert key in header, key
    assert "qat/centroid/fc3.weight/0" not in header  # 32 centroids: their range only
    rows = [dict(zip(header, line.split(","), strict=False)) for line in text.splitlines()[1:]]
    lows = [float(r["qat/centroid/fc1.weight/0"]) for r in rows if r["qat/centroid/fc1.weight/0"]]
    assert len(lows) == 2 and lows[0] != lows[1]  # over time, once per epoch


def test_logs_a_histogram_with_centroids_under_wandb(tmp_path, monkeypatch):
    import wandb

    logger, logged = offline_wandb(tmp_path, monkeypatch)
    qat = QATCallback(bits=2, scheme="kmeans", include="fc2")
    make_trainer(tmp_path, [qat], max_epochs=1, logger=logger).fit(TinyMLP())
    logger.experiment.finish()  # the next test's logger starts its own run
    images = [p["qat/centroids/fc2.weight"] for p in logged if "qat/centroids/fc2.weight" in p]
    assert len(images) == 1 and isinstance(images[0], wandb.Image)
