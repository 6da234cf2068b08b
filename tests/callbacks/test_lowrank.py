"""LowRankCallback on a small Trainer: the rank constraint, resume, composition, bad input."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import LowRankCallback, PruneCallback, QATCallback
from lightning_compress.layout import layout_for_name
from tests.helpers import (
    EpochSeededSampler,
    TinyMLP,
    TinyTransformer,
    digest,
    make_trainer,
    offline_wandb,
    random_classification,
)

METHODS = ["projected", "factored"]


def _rank_of(weight: torch.Tensor, layout=None) -> int:
    matrix = layout.matrix(weight) if layout is not None else weight.reshape(weight.shape[0], -1)
    s = torch.linalg.svdvals(matrix.detach().double())
    return int((s > 1e-5 * s[0]).sum())


class RankWatcher(pl.Callback):
    """Records every target's rank after every optimizer step (checked by SVD)."""

    def __init__(self, lowrank: LowRankCallback) -> None:
        self.lowrank = lowrank
        self.seen: list[tuple[int, dict[str, int], dict[str, int]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ranks = {
            n: _rank_of(pl_module.get_parameter(n), layout_for_name(pl_module, n))
            for n in self.lowrank.targets
        }
        self.seen.append((trainer.global_step, ranks, dict(self.lowrank.ranks)))


@pytest.mark.parametrize("method", METHODS)
def test_every_step_after_the_first_event_keeps_the_rank(tmp_path, method):
    lowrank = LowRankCallback(
        rank=3, schedule="linear", start=2, end="2ep", every=3, exclude="fc3", method=method
    )
    watch = RankWatcher(lowrank)
    model = TinyMLP()
    keys = list(model.state_dict())
    make_trainer(tmp_path, [lowrank, watch], max_epochs=3).fit(model)
    assert [e["step"] for e in lowrank.events] == [2, 5, 8, 11, 14, 16]
    after = [(step, ranks, held) for step, ranks, held in watch.seen if step > 2]
    assert after, "no step after the first event"
    for step, ranks, held in after:
        for name in ("fc1.weight", "fc2.weight"):
            assert ranks[name] <= held[name], (step, name, ranks, held)
    assert lowrank.ranks == {"fc1.weight": 3, "fc2.weight": 3}
    assert _rank_of(model.fc1.weight) == 3 and _rank_of(model.fc3.weight) == 4  # fc3 untouched
    # The state dict is the plain model's: a strict load into a fresh TinyMLP.
    assert list(model.state_dict()) == keys
    plain = TinyMLP()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 32)
    assert torch.allclose(plain(x), model(x), atol=1e-5)  # after fit: the plain forward


def test_factored_training_computes_through_the_factors(tmp_path):
    lowrank = LowRankCallback(rank=2, schedule="oneshot", start=0, include="fc1", method="factored")

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            layer = lowrank.factored["fc1.weight"]
            self.trained = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
            self.ids = (id(layer.first), id(layer.second), id(pl_module.fc1.weight))
            x = torch.randn(3, 32)
            with torch.no_grad():
                dense = F.linear(x, pl_module.fc1.weight, pl_module.fc1.bias)
                self.gap = float((pl_module.fc1(x) - dense).abs().max())

    probe = Probe()
    model = TinyMLP()
    make_trainer(tmp_path, [lowrank, probe], max_epochs=1).fit(model)
    first, second, weight = probe.ids
    assert first in probe.trained and second in probe.trained and weight not in probe.trained
    assert probe.gap < 1e-5  # the written-back weight is the product the forward used
    assert "forward" not in vars(model.fc1) and model.fc1.weight.requires_grad  # plain after fit


def _resume_run(tmp_path, method, stop_epochs=None, ckpt_path=None):
    pl.seed_everything(0)
    model = TinyMLP()
    lowrank = LowRankCallback(
        rank=0.25, schedule="cubic", start=0, end="3ep", every="1ep", exclude="fc3", method=method
    )
    trainer = make_trainer(tmp_path, [lowrank], max_epochs=stop_epochs or 4)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, lowrank, trainer


@pytest.mark.parametrize("method", METHODS)
def test_resume_mid_schedule_reproduces_the_uninterrupted_run(tmp_path, method):
    full_model, full, _ = _resume_run(tmp_path / "full", method)
    _, half, half_trainer = _resume_run(tmp_path / "half", method, stop_epochs=2)
    assert 8 < half.ranks["fc1.weight"] < 32  # stopped in the middle of the schedule
    half_trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_model, resumed, _ = _resume_run(
        tmp_path / "resumed", method, ckpt_path=tmp_path / "mid.ckpt"
    )
    assert resumed.ranks == full.ranks == {"fc1.weight": 8, "fc2.weight": 4}
    assert resumed.events == full.events
    for (name, a), (_, b) in zip(
        full_model.named_parameters(), resumed_model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_state_key_and_checkpoint_content(tmp_path):
    lowrank = LowRankCallback(rank=2, schedule="oneshot", start=0, include=["fc1", "fc2"])
    assert lowrank.state_key == (
        "LowRankCallback{'rank': 2, 'energy': None, 'params': None, 'schedule': 'oneshot', "
        "'include': ['fc1', 'fc2'], 'exclude': None}"
    )
    trainer = make_trainer(tmp_path, [lowrank], max_epochs=1)
    trainer.fit(TinyMLP())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    state = torch.load(tmp_path / "x.ckpt", weights_only=True)["callbacks"][lowrank.state_key]
    assert state["ranks"] == {"fc1.weight": 2, "fc2.weight": 2}
    assert state["method"] == "projected" and state["version"] == 1
    assert {n: tuple(b.shape) for n, b in state["bases"].items()} == {
        "fc1.weight": (32, 2),
        "fc2.weight": (32, 2),
    }


def _fit_and_save(tmp_path, lowrank):
    trainer = make_trainer(tmp_path, [lowrank], max_epochs=1)
    trainer.fit(TinyMLP())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    return torch.load(tmp_path / "a.ckpt", weights_only=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["bases"].update({"fc1.weight": torch.zeros(32, 5)}), "basis for 'fc1.weight'"),
        (lambda s: s["ranks"].update({"fc3.weight": 1}), "does not target"),
        (lambda s: s.update(method="factored"), "written with method='factored'"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_before_a_step(tmp_path, change, message):
    def make():
        return LowRankCallback(rank=2, schedule="oneshot", start=0, include=["fc1", "fc2"])

    ckpt = _fit_and_save(tmp_path, make())
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("LowRankCallback")]
    change(ckpt["callbacks"][key])
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [make()], max_epochs=2).fit(
            TinyMLP(), ckpt_path=tmp_path / "bad.ckpt"
        )


def test_weights_that_are_not_of_the_checkpoints_rank_are_refused(tmp_path):
    def make():
        return LowRankCallback(rank=2, schedule="oneshot", start=0, include="fc1")

    ckpt = _fit_and_save(tmp_path, make())
    ckpt["state_dict"]["fc1.weight"] = torch.randn(32, 32)  # another model's weight
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is not the weight the checkpoint"):
        make_trainer(tmp_path, [make()], max_epochs=2).fit(
            TinyMLP(), ckpt_path=tmp_path / "other.ckpt"
        )


class EmbeddingModel(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 32)


@pytest.mark.parametrize(
    ("model", "kwargs", "others", "message"),
    [
        (TinyMLP, {"rank": 8}, [], r"`rank`=8 is above the full rank 4 of 'fc3.weight'"),
        (TinyMLP, {"rank": 2, "include": "fc9"}, [], "`include` pattern 'fc9' matches no"),
        (TinyMLP, {"rank": 2, "overrides": {"fc9": 1}}, [], "`overrides` pattern 'fc9'"),
        (EmbeddingModel, {"rank": 2, "include": "emb.weight"}, [], "cannot be factored"),
        (
            TinyTransformer,
            {"rank": 2, "include": "encoder.self_attn", "method": "factored"},
            [],
            "method='factored' cannot train 'encoder.self_attn.in_proj_weight'",
        ),
        (
            TinyMLP,
            {"rank": 2, "include": "fc1"},
            [PruneCallback(sparsity=0.5, include="fc1")],
            "either pruned or factored",
        ),
        (
            TinyMLP,
            {"rank": 2, "include": "fc1", "method": "factored"},
            [QATCallback(bits=8, include="fc1")],
            "QATCallback would quantize a weight the forward never reads",
        ),
    ],
)
def test_bad_targeting_fails_before_the_first_step(tmp_path, model, kwargs, others, message):
    module = model()
    before = digest(module.state_dict())
    lowrank = LowRankCallback(schedule="oneshot", start=0, **kwargs)
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [lowrank, *others], max_epochs=1).fit(module)
    assert digest(module.state_dict()) == before  # nothing changed


def test_attention_in_projections_and_qat_compose_with_projection(tmp_path):
    lowrank = LowRankCallback(rank=2, schedule="oneshot", start=1, include="encoder.self_attn")
    qat = QATCallback(bits=8, include="encoder.self_attn")
    model = TinyTransformer()
    make_trainer(tmp_path, [qat, lowrank], max_epochs=2).fit(model)
    qat.remove(model)
    attn = model.encoder.self_attn
    assert set(lowrank.ranks) == {
        "encoder.self_attn.in_proj_weight",
        "encoder.self_attn.out_proj.weight",
    }
    assert _rank_of(attn.in_proj_weight) == 2 and _rank_of(attn.out_proj.weight) == 2
    assert set(qat.record) >= set(lowrank.ranks)  # QAT quantized the rank-2 products
    record = lowrank.record
    assert {n: r.rank for n, r in record.items()} == lowrank.ranks
    product = record["encoder.self_attn.in_proj_weight"].matrix()
    assert torch.allclose(product, attn.in_proj_weight.detach(), atol=1e-5)


class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x[:, :16].reshape(-1, 1, 4, 4).repeat(1, 1, 2, 2)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        data = random_classification()
        return DataLoader(data, batch_size=8, sampler=EpochSeededSampler(len(data)))


@pytest.mark.parametrize("method", METHODS)
def test_convolutions_are_factored_on_their_out_by_in_kernel_matrix(tmp_path, method):
    lowrank = LowRankCallback(rank=3, schedule="oneshot", start=0, include="conv2", method=method)
    model = ConvNet()
    make_trainer(tmp_path, [lowrank], max_epochs=1).fit(model)
    assert _rank_of(model.conv2.weight) == 3  # of its (8, 8*3*3) matrix
    assert lowrank.layer_stats()[0]["params"] == 3 * (8 + 72)


def test_energy_chooses_each_layers_rank_from_its_spectrum(tmp_path):
    lowrank = LowRankCallback(energy=0.6, schedule="oneshot", start=4, exclude="fc3")
    model = TinyMLP()
    make_trainer(tmp_path, [lowrank], max_epochs=1).fit(model)
    layers = lowrank.events[0]["layers"]
    for name, layer in layers.items():
        assert layer["energy"] >= 0.6 and layer["rank"] == lowrank.ranks[name] < 16


def test_events_are_logged_with_spectra_under_wandb(tmp_path, monkeypatch):
    logger, logged = offline_wandb(tmp_path, monkeypatch)
    lowrank = LowRankCallback(rank=2, schedule="oneshot", start=0, include="fc2")
    make_trainer(tmp_path, [lowrank], max_epochs=1, logger=logger).fit(TinyMLP())
    logger.experiment.finish()  # the next test's logger starts its own run
    keys = {k for payload in logged for k in payload}
    assert "lowrank/spectrum/fc2.weight" in keys
    assert {"lowrank/rank/fc2.weight", "lowrank/energy/fc2.weight", "lowrank/params"} <= keys


@pytest.mark.parametrize(
    ("method", "mode", "refused"),
    [("projected", "weights", True), ("projected", "lr", False), ("factored", "lr", True)],
)
def test_rewinding_is_followed_only_where_the_rank_survives_it(tmp_path, method, mode, refused):
    from lightning_compress import RewindCallback

    lowrank = LowRankCallback(rank=2, schedule="oneshot", start=0, include="fc2", method=method)
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep", include="fc1")
    rewind = RewindCallback(to=0, mode=mode)
    trainer = make_trainer(tmp_path, [lowrank, prune, rewind], max_epochs=2)
    model = TinyMLP()
    if refused:
        with pytest.raises(ValueError, match=f"cannot follow a RewindCallback with mode='{mode}'"):
            trainer.fit(model)
        return
    trainer.fit(model)
    assert rewind.rewinds and _rank_of(model.fc2.weight) == 2


def test_distillation_and_pruning_of_other_layers_compose(tmp_path):
    from lightning_compress import DistillationCallback

    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    lowrank = LowRankCallback(rank=2, schedule="oneshot", start=0, include="fc2", method="factored")
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start=0, include="fc1")
    model = TinyMLP()
    make_trainer(tmp_path, [DistillationCallback(teacher), lowrank, prune], max_epochs=1).fit(model)
    assert _rank_of(model.fc2.weight) == 2
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.5)
