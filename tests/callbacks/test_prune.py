import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from lightning_compress import PruneCallback
from lightning_compress.pruning.criteria import CRITERIA, register_criterion

from ..helpers import TinyMLP, TinyTransformer, digest, make_trainer, offline_wandb

WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]


class ZeroWatcher(pl.Callback):
    """Checks after every batch that pruned weights are exactly zero and masks only grow."""

    def __init__(self, prune: PruneCallback) -> None:
        self.prune = prune
        self.previous: dict[str, torch.Tensor] = {}
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for name, keep in self.prune.masks.keep_masks().items():
            assert torch.all(params[name].detach()[~keep] == 0), (
                f"{name} regrew at {trainer.global_step}"
            )
            if name in self.previous:
                assert torch.all(keep <= self.previous[name]), f"{name} was un-pruned"
            self.previous[name] = keep.clone()
            self.checked += 1


class LayerSparsity:
    """A PruneListener recording each layer's sparsity after every pruning event."""

    def __init__(self) -> None:
        self.after: list[dict[str, float]] = []

    def on_prune_ready(self, trainer, pl_module, prune):
        pass

    def before_prune(self, trainer, pl_module, prune, step):
        pass

    def after_prune(self, trainer, pl_module, prune, step):
        self.after.append({r["layer"]: r["sparsity"] for r in prune.layer_stats()})


def fit(tmp_path, callbacks, model=None, **kwargs):
    model = model or TinyMLP()
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return model, trainer


# -- misconfiguration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"`sparsity` must be in \[0, 1\)"),
        ({"start": "5ep", "end": "2ep"}, r"`end`='2ep' is before `start`='5ep'"),
        ({"every": 0}, "`every` must be at least one step"),
        ({"every": "0ep"}, "`every` must be at least one step"),
        (
            {"criterion": "chocolate"},
            r"`criterion` must be one of \[.*'magnitude'.*got 'chocolate'",
        ),
        ({"schedule": "exponential"}, "`schedule` must be one of"),
        ({"structure": "blocks"}, "`structure`"),
        ({"structure": "4:4"}, "`structure`"),
        ({"structure": "5:4"}, "`structure`"),
        ({"structure": "2:4", "sparsity": 0.9}, "contradicts `structure`"),
        ({"scope": "model"}, "`scope` must be one of"),
        ({"schedule": "iterative"}, r"`rate` must be in \(0, 1\)"),
        ({"schedule": "iterative", "rate": 1.0}, r"`rate` must be in \(0, 1\)"),
        ({"rate": 0.2}, "`rate` applies only to schedule='iterative'"),
        ({"start": "ten"}, "`start`"),
        ({"overrides": {"fc3": 1.5}}, "`overrides` sparsity must be in"),
        ({"min_density": 1.0}, r"`min_density` must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["nope"]}, "`include` pattern 'nope' matches no module"),
        ({"include": ["fc1.bias"]}, "'fc1.bias'.*not a weight"),
        ({"exclude": ["fc9"]}, "`exclude` pattern 'fc9' matches none"),
        ({"overrides": {"fc9": 0.5}}, "`overrides` pattern 'fc9' matches none"),
        ({"structure": "2:3"}, "not divisible by M=3"),
    ],
)
def test_bad_targeting_raises_before_the_first_step(tmp_path, kwargs, match):
    model = TinyMLP()
    before = digest(dict(model.named_parameters()))
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [PruneCallback(**kwargs)], model=model)
    assert digest(dict(model.named_parameters())) == before


def test_overlapping_callbacks_raise(tmp_path):
    a = PruneCallback(include=["fc1", "fc2"])
    b = PruneCallback(include=["fc2", "fc3"], sparsity=0.5)
    with pytest.raises(ValueError, match=r"same weights \['fc2.weight'\]"):
        fit(tmp_path, [a, b])


def test_epoch_steps_need_a_sized_dataloader(tmp_path):
    class Endless(TinyMLP):
        def train_dataloader(self):
            base = super().train_dataloader()

            class Stream(torch.utils.data.IterableDataset):
                def __iter__(self):
                    yield from base

            return torch.utils.data.DataLoader(Stream(), batch_size=None)

    with pytest.raises(ValueError, match="no length"):
        fit(tmp_path, [PruneCallback()], model=Endless(), max_steps=5, max_epochs=None)


# -- schedule exactness ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["oneshot", "linear", "cubic"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_equals_the_schedule_at_every_event(tmp_path, schedule, scope):
    prune = PruneCallback(
        sparsity=0.8, schedule=schedule, start="1ep", end="3ep", every="3it", scope=scope
    )
    watcher, layers = ZeroWatcher(prune), LayerSparsity()
    prune.add_listener(layers)
    model, trainer = fit(tmp_path, [prune, watcher], max_epochs=4)
    assert watcher.checked > 0
    events = prune.events
    assert events, "no pruning event happened"
    assert len(layers.after) == len(events)
    sizes = {n: p.numel() for n, p in model.named_parameters() if n in WEIGHTS}
    total = sum(sizes.values())
    for event, per_layer in zip(events, layers.after, strict=True):
        target = prune.plan.targets(event["step"])
        assert event["nonzero"] == round((1 - event["sparsity"]) * total)
        if scope == "global":
            zeros = event["sparsity"] * total
            assert abs(zeros - target[WEIGHTS[0]] * total) <= 1.0 + 1e-6
        else:
            for name, n in sizes.items():
                assert abs(per_layer[name] * n - target[name] * n) <= 1.0 + 1e-6
    # The clock: 8 batches per epoch, so 1ep..3ep is steps 8..24; the final value is reached.
    assert events[0]["step"] == 8
    assert events[-1]["step"] == (8 if schedule == "oneshot" else 24)
    assert math.isclose(events[-1]["sparsity"], 0.8, abs_tol=1 / total)
    assert trainer.global_step == 32


def test_gradient_accumulation_and_limits_convert_epochs_exactly(tmp_path):
    # 8 batches per epoch limited to 7, accumulated by 3: ceil(7 / 3) = 3 optimizer steps/epoch.
    prune = PruneCallback(sparsity=0.5, schedule="linear", start="1ep", end="3ep", every="1ep")
    _, trainer = fit(
        tmp_path, [prune], max_epochs=4, limit_train_batches=7, accumulate_grad_batches=3
    )
    assert [e["step"] for e in prune.events] == [3, 6, 9]
    assert trainer.global_step == 12
    assert math.isclose(prune.events[-1]["sparsity"], 0.5, abs_tol=1e-3)


def test_pruned_weights_stay_zero_under_adamw_and_bf16(tmp_path):
    prune = PruneCallback(sparsity=0.7, schedule="cubic", start="0ep", end="2ep", every="2it")
    watcher = ZeroWatcher(prune)
    model, _ = fit(tmp_path, [prune, watcher], model=TinyMLP("adamw"), precision="bf16-mixed")
    assert watcher.checked > 20
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in WEIGHTS)
    total = sum(p.numel() for n, p in model.named_parameters() if n in WEIGHTS)
    assert abs(zeros - round(0.7 * total)) <= 1


def test_layer_overrides_follow_their_own_target(tmp_path):
    prune = PruneCallback(
        sparsity=0.9, schedule="oneshot", start="1ep", scope="global", overrides={"fc3": 0.25}
    )
    model, _ = fit(tmp_path, [prune], max_epochs=2)
    assert (model.fc3.weight == 0).sum() == round(0.25 * 64)
    pooled = [model.fc1.weight, model.fc2.weight]
    assert sum(int((w == 0).sum()) for w in pooled) == round(0.9 * (1024 + 512))


def test_two_four_structure_keeps_two_of_every_four(tmp_path):
    prune = PruneCallback(structure="2:4", schedule="linear", start="0ep", end="2ep", every="1ep")
    watcher = ZeroWatcher(prune)
    model, _ = fit(tmp_path, [prune, watcher], max_epochs=3)
    for name in WEIGHTS:
        w = dict(model.named_parameters())[name].detach()
        groups = (w.view(w.shape[0], -1, 4) == 0).sum(dim=-1)
        assert torch.all(groups >= 2), name
    assert prune.sparsity == 0.5


def test_channel_structure_prunes_whole_output_rows(tmp_path):
    prune = PruneCallback(
        sparsity=0.5, structure="channel", scope="layer", schedule="oneshot", start="1ep"
    )
    model, _ = fit(tmp_path, [prune], max_epochs=2)
    for name in WEIGHTS:
        w = dict(model.named_parameters())[name].detach()
        dead = (w == 0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * w.shape[0]), name
        # Rows are either entirely pruned or untouched by the mask.
        keep = prune.masks.keep_mask(name)
        assert torch.all(keep.all(dim=1) | (~keep).all(dim=1))


def test_constant_schedule_holds_existing_zeros(tmp_path):
    model = TinyMLP()
    with torch.no_grad():
        model.fc1.weight[:, :16] = 0
    prune = PruneCallback(schedule="constant", include=["fc1"])
    watcher = ZeroWatcher(prune)
    fit(tmp_path, [prune, watcher], model=model)
    assert torch.all(model.fc1.weight[:, :16] == 0)
    assert (model.fc1.weight != 0).sum() == 32 * 16


def test_custom_criterion_from_the_registry(tmp_path, monkeypatch):
    from lightning_compress.pruning import criteria

    monkeypatch.setattr(criteria, "CRITERIA", dict(CRITERIA))  # leave the real registry alone
    name = "keep_first_column_test"

    @register_criterion(name)
    def first_column(weight, ctx):
        scores = torch.zeros_like(weight, dtype=torch.float32)
        scores[..., 0] = 1.0
        return scores

    prune = PruneCallback(
        sparsity=0.75, criterion=name, include=["fc2"], schedule="oneshot", start=0
    )
    model, _ = fit(tmp_path, [prune], max_epochs=1)
    assert torch.all(model.fc2.weight[:, 0] != 0)
    assert (model.fc2.weight == 0).sum() == round(0.75 * 512)


def test_random_criterion_is_a_baseline_not_magnitude(tmp_path):
    masks = {}
    for criterion in ("random", "magnitude"):
        pl.seed_everything(0)
        prune = PruneCallback(
            sparsity=0.5, criterion=criterion, schedule="oneshot", start="1ep", include=["fc1"]
        )
        model, _ = fit(tmp_path / criterion, [prune], max_epochs=2)
        assert (model.fc1.weight == 0).sum() == 512
        masks[criterion] = prune.masks.keep_mask("fc1.weight")
    # Same seed, same data: only the criterion differs. Random keeps about half of what
    # magnitude keeps; identical masks would mean the criterion was ignored.
    overlap = (masks["random"] & masks["magnitude"]).sum() / 512
    assert 0.35 < float(overlap) < 0.65


# -- models the example zoo does not have ---------------------------------------------------------


def test_attention_model_with_dict_batches_and_kwargs(tmp_path):
    model = TinyTransformer()
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start=0)
    watcher = ZeroWatcher(prune)
    fit(tmp_path, [prune, watcher], model=model, max_epochs=2)
    assert "encoder.self_attn.in_proj_weight" in prune.targets
    assert "encoder.self_attn.out_proj.weight" in prune.targets
    total = sum(dict(model.named_parameters())[n].numel() for n in prune.targets)
    zeros = sum(int((dict(model.named_parameters())[n] == 0).sum()) for n in prune.targets)
    assert abs(zeros - total // 2) <= 1
    model.eval()  # the fused fast path reads the same (masked) parameters
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8), pool="first")
    assert out.shape == (2, 4)


# -- checkpoints and resume ----------------------------------------------------------------------


def test_state_key_and_checkpoint_content(tmp_path):
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep", include=["fc1"])
    _, trainer = fit(tmp_path, [prune], max_epochs=2)
    assert prune.state_key == (
        "PruneCallback{'sparsity': 0.5, 'schedule': 'oneshot', 'structure': 'unstructured', "
        "'include': ['fc1'], 'exclude': None}"
    )
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["callbacks"][prune.state_key]
    assert state["version"] == 1
    assert state["last_event"] == 8
    assert state["events"] == [{"step": 8, "sparsity": 0.5, "nonzero": 512}]
    assert list(state["masks"]["packed"]) == ["fc1.weight"]
    assert state["masks"]["packed"]["fc1.weight"].dtype == torch.uint8
    assert state["masks"]["packed"]["fc1.weight"].numel() == 1024 // 8
    assert not any(k.endswith(("_orig", "_mask")) for k in ckpt["state_dict"])


def test_checkpoint_loads_into_plain_model_strictly(tmp_path):
    prune = PruneCallback(sparsity=0.8, schedule="cubic", start=0, end="2ep", every="4it")
    model, trainer = fit(tmp_path, [prune], max_epochs=3)
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    fresh = TinyMLP.load_from_checkpoint(tmp_path / "pruned.ckpt", weights_only=True, strict=True)
    plain = TinyMLP()
    plain.load_state_dict(
        torch.load(tmp_path / "pruned.ckpt", weights_only=True)["state_dict"], strict=True
    )
    for name in WEIGHTS:
        keep = prune.masks.keep_mask(name)
        for m in (fresh, plain):
            w = dict(m.named_parameters())[name]
            assert torch.all(w[~keep] == 0)
            assert torch.equal(w, dict(model.named_parameters())[name])


@pytest.mark.parametrize("save_on_train_epoch_end", [False, True])
def test_checkpoints_saved_while_pruning(tmp_path, save_on_train_epoch_end):
    prune = PruneCallback(sparsity=0.6, schedule="linear", start=0, end="3ep", every="3it")
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpts",
        monitor="train_loss",
        save_top_k=2,
        save_last=True,
        every_n_train_steps=None if save_on_train_epoch_end else 5,
        save_on_train_epoch_end=save_on_train_epoch_end,
    )
    fit(tmp_path, [prune, ckpt], max_epochs=4, enable_checkpointing=True)
    files = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert len(files) >= 2
    for path in files:
        saved = torch.load(path, weights_only=True)
        state = saved["callbacks"][prune.state_key]
        masks = prune.masks.unpack_state(state["masks"])
        plain = TinyMLP()
        plain.load_state_dict(saved["state_dict"], strict=True)
        for name, keep in masks.items():
            assert torch.all(dict(plain.named_parameters())[name][~keep] == 0), path.name


def test_validate_test_predict_with_the_callback(tmp_path):
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep")
    model, trainer = fit(tmp_path, [prune], max_epochs=2, limit_val_batches=2)
    zeros = {n: int((p == 0).sum()) for n, p in model.named_parameters()}
    trainer.validate(model)
    trainer.test(model)
    trainer.predict(model)
    assert zeros == {n: int((p == 0).sum()) for n, p in model.named_parameters()}


def test_explicit_parameter_list_prunes_exactly_those(tmp_path):
    """ModelPruning's `parameters_to_prune`: only the named weights change."""
    pl.seed_everything(0)
    model = TinyMLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune = PruneCallback(
        sparsity=0.5, schedule="oneshot", start=0, include=["fc1.weight", "fc3.weight"]
    )
    fit(tmp_path, [prune], model=model, max_epochs=1)
    assert prune.targets == ["fc1.weight", "fc3.weight"]
    assert int((model.fc1.weight == 0).sum()) + int((model.fc3.weight == 0).sum()) == 544
    assert torch.count_nonzero(model.fc2.weight) == model.fc2.weight.numel()
    assert all(torch.count_nonzero(model.get_parameter(f"{n}.bias")) > 0 for n in ("fc1", "fc3"))
    assert not torch.equal(before["fc2.weight"], model.fc2.weight)  # trained, not pruned


def test_two_callbacks_on_disjoint_layers(tmp_path):
    a = PruneCallback(sparsity=0.5, include=["fc1"], schedule="oneshot", start="1ep")
    b = PruneCallback(
        sparsity=0.25,
        include=["fc2", "fc3"],
        criterion="random",
        schedule="linear",
        start=0,
        end="2ep",
        every="1ep",
    )
    model, trainer = fit(tmp_path, [a, b], max_epochs=3)
    assert (model.fc1.weight == 0).sum() == 512
    assert (
        abs(
            int((model.fc2.weight == 0).sum())
            + int((model.fc3.weight == 0).sum())
            - round(0.25 * 576)
        )
        <= 1
    )
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert a.state_key in states and b.state_key in states and a.state_key != b.state_key


def _resume_run(tmp_path, stop_epochs=None, ckpt_path=None):
    pl.seed_everything(7)
    model = TinyMLP()
    prune = PruneCallback(sparsity=0.9, schedule="cubic", start="1ep", end="4ep", every="3it")
    trainer = make_trainer(tmp_path, [prune], max_epochs=stop_epochs or 6)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, prune, trainer


def test_resume_mid_schedule_reproduces_the_uninterrupted_run(tmp_path):
    full_model, full_prune, _ = _resume_run(tmp_path / "full")
    _, half_prune, half_trainer = _resume_run(tmp_path / "half", stop_epochs=2)
    mid = half_prune.events[-1]["sparsity"]
    assert 0 < mid < 0.9  # stopped in the middle of the schedule
    half_trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_model, resumed_prune, _ = _resume_run(
        tmp_path / "resumed", ckpt_path=tmp_path / "mid.ckpt"
    )
    assert digest(resumed_prune.masks.keep_masks()) == digest(full_prune.masks.keep_masks())
    assert resumed_prune.events == full_prune.events  # the record rides in the checkpoint
    for (name, a), (_, b) in zip(
        full_model.named_parameters(), resumed_model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_a_checkpoint_without_events_still_resumes(tmp_path):
    """Checkpoints written before `events` existed hold no such key."""

    def prune():
        return PruneCallback(sparsity=0.5, schedule="linear", start=0, end="2ep", every="1ep")

    first = prune()
    _, trainer = fit(tmp_path, [first], max_epochs=1)
    assert [e["step"] for e in first.events] == [0]
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    ckpt = torch.load(tmp_path / "old.ckpt", weights_only=True)
    del ckpt["callbacks"][first.state_key]["events"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    resumed = prune()
    make_trainer(tmp_path, [resumed], max_epochs=3).fit(TinyMLP(), ckpt_path=tmp_path / "old.ckpt")
    assert [e["step"] for e in resumed.events] == [8, 16]


# -- layer collapse ----------------------------------------------------------------------------


class MLPBlock(TinyMLP):
    """TinyMLP around an LLM MLP's up/down pair, 4096->11008->4096 scaled to 256->688->256
    (the same fan-in ratio), at default nn.Linear init."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = torch.nn.Linear(32, 256)
        self.up = torch.nn.Linear(256, 688)
        self.down = torch.nn.Linear(688, 256)
        self.fc3 = torch.nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.down(torch.relu(self.up(torch.relu(self.fc2(x))))))


@pytest.mark.parametrize("min_density", [0.0, PruneCallback().min_density])
def test_global_pruning_keeps_the_wider_fan_in_layer_at_its_floor(tmp_path, caplog, min_density):
    prune = PruneCallback(
        sparsity=0.9, schedule="oneshot", start=0, include=["up", "down"], min_density=min_density
    )
    with caplog.at_level(logging.WARNING, logger="lightning_compress"):
        model, _ = fit(tmp_path, [prune], model=MLPBlock(), max_epochs=1, limit_train_batches=2)
    kept = int(torch.count_nonzero(model.down.weight))
    numel = model.down.weight.numel()
    assert prune.events[-1]["nonzero"] == round(0.1 * 2 * numel)  # the global target is met
    warnings = [m for m in caplog.messages if m.startswith("PruneCallback: 'down.weight'")]
    if min_density == 0:
        assert kept == 0  # the failure: one threshold empties the layer of wider fan-in
        assert len(warnings) == 1 and "is far sparser than asked from step 0" in warnings[0]
        assert "sparsity 1.0000, global target 0.9000" in warnings[0]
    else:
        assert kept == math.ceil(min_density * numel)
        assert len(warnings) == 1 and "held at the `min_density` floor" in warnings[0]


def test_floors_beyond_the_target_are_kept_with_a_warning(tmp_path, caplog):
    prune = PruneCallback(sparsity=0.9, schedule="oneshot", start="1ep", min_density=0.5)
    with caplog.at_level(logging.WARNING, logger="lightning_compress"):
        fit(tmp_path, [prune], max_epochs=2)
    assert [r["sparsity"] for r in prune.layer_stats()] == [0.5] * 3
    (short,) = [m for m in caplog.messages if "cannot be met" in m]
    assert short.startswith("PruneCallback: the global target sparsity 0.9000 cannot be met")
    assert "every layer at `min_density`=0.5: the floors are kept, sparsity 0.5000" in short
    assert sum("held at the `min_density` floor" in m for m in caplog.messages) == 3


# -- logging -----------------------------------------------------------------------------------


def test_logs_sparsity_through_the_trainer_logger(tmp_path, caplog):
    prune = PruneCallback(sparsity=0.5, schedule="linear", start=0, end="2ep", every="1ep")
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO, logger="lightning_compress"):
        fit(tmp_path, [prune], max_epochs=3, logger=logger)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    for key in ("prune/sparsity", "prune/nonzero", "prune/sparsity/fc1.weight"):
        assert key in text
    lines = [m for m in caplog.messages if m.startswith("PruneCallback: step")]
    assert len(lines) == 3
    assert "sparsity 0.5000" in lines[-1]


def test_wandb_gets_a_per_layer_sparsity_table(tmp_path, monkeypatch):
    import wandb

    logger, logged = offline_wandb(tmp_path, monkeypatch)
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep")
    model, _ = fit(tmp_path, [prune], max_epochs=2, logger=logger)
    logger.experiment.finish()

    tables = [d["prune/layers"] for d in logged if "prune/layers" in d]
    assert len(tables) == 1 and isinstance(tables[0], wandb.Table)
    rows = {row[0]: row for row in tables[0].data}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(rows) == linears
    nonzero = int((model.fc1.weight != 0).sum())
    assert rows["fc1.weight"][2] == nonzero
    assert any("prune/sparsity/fc1.weight" in d for d in logged)
    assert list(tmp_path.rglob("*.wandb"))  # the offline run was written locally


class DriftingSGD(torch.optim.Optimizer):
    """A custom rule that moves every weight, gradient or not (as some research optimizers do)."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.add_(1e-3)
        return loss


def test_custom_optimizer_cannot_regrow_pruned_weights(tmp_path):
    class Drifting(TinyMLP):
        def configure_optimizers(self):
            return DriftingSGD(self.parameters())

    prune = PruneCallback(sparsity=0.6, schedule="linear", start=0, end="2ep", every="4it")
    watcher = ZeroWatcher(prune)
    fit(tmp_path, [prune, watcher], model=Drifting(), max_epochs=3)
    assert watcher.checked > 20
