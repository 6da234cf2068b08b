import ast
import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_compress import PruneCallback, RewindCallback
from lightning_compress.callbacks import rewind as rewind_module
from lightning_compress.pruning import PruneEventSource

from ..helpers import TinyMLP, digest, make_trainer, offline_wandb

WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]


class ScheduledMLP(TinyMLP):
    """TinyMLP with a per-step LR schedule, so rewinding the scheduler is observable."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Recording(RewindCallback):
    """Records the model, optimizer and scheduler right before and after every rewind."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.before: list[dict] = []
        self.after: list[dict] = []

    def _record(self, trainer, pl_module):
        return {
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "momentum": {
                n: trainer.optimizers[0].state.get(p, {}).get("momentum_buffer")
                for n, p in pl_module.named_parameters()
            },
            "sched": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())
            if trainer.lr_scheduler_configs
            else None,
        }

    def after_prune(self, trainer, pl_module, prune, step):
        self.before.append(self._record(trainer, pl_module))
        super().after_prune(trainer, pl_module, prune, step)
        self.after.append(self._record(trainer, pl_module))


def iterative(**kwargs):
    args = {"sparsity": 0.75, "schedule": "iterative", "rate": 0.5, "start": "1ep", "every": "1ep"}
    args.update(kwargs)
    return PruneCallback(**args)


def fit(tmp_path, callbacks, model=None, **kwargs):
    model = model or ScheduledMLP()
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return model, trainer


# -- misconfiguration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "rewind"}, r"`mode` must be one of \('weights', 'lr', 'reinit'\), got 'rewind'"),
        ({"to": "early"}, "`to`"),
        ({"to": -1}, "`to`"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewindCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0.0}, r"`rate` must be in \(0, 1\)"),
        ({"rate": 1.2}, r"`rate` must be in \(0, 1\)"),
        ({"rates": {"fc3": 1.0}}, r"`rates` must be in \(0, 1\)"),
        ({"schedule": "cubic", "rate": None, "rates": {"fc3": 0.1}}, "`rates` applies only"),
        ({"criterion": "flipout", "schedule": "constant", "rate": None}, "cannot follow"),
        ({"criterion": "flipout", "structure": "channel"}, "structure='channel'"),
        ({"criterion": "flipout", "flipout_noise": -1.0}, "`flipout_noise` must be >= 0"),
        ({"flipout_noise": 0.5}, "apply only to criterion='flipout'"),
    ],
)
def test_bad_iterative_and_flipout_arguments_raise_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        iterative(**kwargs)


class FirstStepSpy(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [RewindCallback()], "has no PruneCallback"),
        (lambda: [iterative(start="1ep"), RewindCallback(to="2ep")], r"after the first pruning"),
        (lambda: [iterative(criterion="flipout", start=0)], "needs optimizer steps"),
        (lambda: [iterative(rates={"conv": 0.1})], "`rates` pattern 'conv' matches none"),
        (
            lambda: [iterative(rates={"fc3": 0.1}, overrides={"fc3": 0.5})],
            "match both `overrides` and `rates`",
        ),
    ],
)
def test_bad_setups_raise_before_the_first_step(tmp_path, callbacks, match):
    spy = FirstStepSpy()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [*callbacks(), spy])
    assert spy.steps == 0


def test_prune_callbacks_are_found_through_the_protocol_not_their_module():
    tree = ast.parse(Path(rewind_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("lightning_compress.callbacks.") for m in imported if m)
    assert isinstance(PruneCallback(), PruneEventSource)
    assert not isinstance(RewindCallback(), PruneEventSource)


# -- what each mode does -------------------------------------------------------------------------


def test_weights_mode_resets_survivors_optimizer_and_schedule_to_the_snapshot(tmp_path):
    pl.seed_everything(0)
    model = ScheduledMLP()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune, rewind = iterative(), Recording(to=0, mode="weights")
    fit(tmp_path, [prune, rewind], model=model, max_epochs=3)
    assert len(rewind.after) == 2  # events at 1ep and 2ep
    keep = prune.masks.keep_masks()
    last = rewind.after[-1]
    for name, value in last["params"].items():
        expected = theta0[name] * keep[name] if name in keep else theta0[name]
        assert torch.equal(value, expected), name
    assert last["lr"] == pytest.approx(0.1)  # the schedule's start
    assert last["sched"]["last_epoch"] == 0
    assert all(m is None for m in last["momentum"].values())  # no momentum before step 0
    assert rewind.before[-1]["lr"] < 0.1  # the schedule had moved on before the rewind


def test_lr_mode_keeps_the_weights_and_replays_the_schedule(tmp_path):
    prune, rewind = iterative(), Recording(to=0, mode="lr")
    fit(tmp_path, [prune, rewind], max_epochs=3)
    for before, after in zip(rewind.before, rewind.after, strict=True):
        for name in before["params"]:
            assert torch.equal(before["params"][name], after["params"][name]), name
        assert after["lr"] == pytest.approx(0.1) and before["lr"] < 0.1
        assert after["sched"]["last_epoch"] == 0


def test_late_rewinding_restores_the_weights_and_momentum_of_step_k(tmp_path):
    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4 and not hasattr(self, "params"):
                self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    spy = Snapshot()
    prune, rewind = iterative(start="2ep", every="1ep"), Recording(to="4it", mode="weights")
    fit(tmp_path, [prune, rewind, spy], max_epochs=3)
    keep = prune.masks.keep_masks()
    after = rewind.after[0]
    for name, value in after["params"].items():
        expected = spy.params[name] * keep[name] if name in keep else spy.params[name]
        assert torch.equal(value, expected), name
    # Momentum of step 4 came back, with pruned entries zeroed.
    momentum = after["momentum"]["fc1.weight"]
    assert momentum is not None and torch.all(momentum[~keep["fc1.weight"]] == 0)
    assert torch.count_nonzero(momentum) > 0


def test_reinit_draws_fresh_seeded_weights_and_keeps_the_masks(tmp_path):
    pl.seed_everything(0)
    model = ScheduledMLP()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = []
    for run in range(2):
        pl.seed_everything(0)
        prune, rewind = iterative(), Recording(to=0, mode="reinit", seed=3)
        fit(tmp_path / str(run), [prune, rewind], model=ScheduledMLP(), max_epochs=2)
        runs.append((prune, rewind))
    (prune, rewind), (_, again) = runs
    after = rewind.after[0]["params"]
    keep = prune.masks.keep_masks()
    for name in WEIGHTS:
        assert torch.all(after[name][~keep[name]] == 0)
        kept = after[name][keep[name]]
        assert not torch.allclose(kept, theta0[name][keep[name]])
        assert not torch.allclose(kept, rewind.before[0]["params"][name][keep[name]])
        assert torch.equal(after[name], again.after[0]["params"][name])  # seeded
    # Same distribution as the initialisation (kaiming-uniform bound of nn.Linear).
    bound = 1 / 32**0.5
    assert after["fc2.weight"].abs().max() <= bound
    assert after["fc2.weight"][keep["fc2.weight"]].abs().mean() > bound / 4


def test_masks_are_never_rewound(tmp_path):
    prune, rewind = iterative(), Recording(to=0, mode="weights")
    fit(tmp_path, [prune, rewind], max_epochs=4)
    sparsities = [float((r["params"]["fc1.weight"] == 0).float().mean()) for r in rewind.after]
    assert sparsities == sorted(sparsities) and sparsities[-1] > sparsities[0]
    assert (
        abs(sum(float((prune.masks.keep_mask(n) == 0).sum()) for n in WEIGHTS) / 1600 - 0.75) < 1e-3
    )


@pytest.mark.parametrize("mode", ["weights", "lr", "reinit"])
def test_order_of_callbacks_does_not_matter(tmp_path, mode):
    results = []
    for order in ("prune-first", "rewind-first"):
        pl.seed_everything(0)
        model = ScheduledMLP()
        prune, rewind = iterative(start="4it", every="4it"), RewindCallback(to="4it", mode=mode)
        callbacks = [prune, rewind] if order == "prune-first" else [rewind, prune]
        fit(tmp_path / order, callbacks, model=model, max_epochs=2)
        results.append(digest(dict(model.named_parameters())))
    assert results[0] == results[1]


def test_to_equal_to_the_first_event_snapshots_before_pruning(tmp_path):
    prune, rewind = iterative(start="1ep"), RewindCallback(to="1ep")
    fit(tmp_path, [prune, rewind], max_epochs=2)
    snap = rewind.snapshot["model"]["fc1.weight"]
    assert torch.count_nonzero(snap) == snap.numel()


# -- checkpoint and resume -----------------------------------------------------------------------


def _resume_run(tmp_path, mode, stop_epochs=None, ckpt_path=None, criterion="magnitude"):
    pl.seed_everything(11)
    model = ScheduledMLP()
    prune = iterative(start="2ep", every="2ep", sparsity=0.875, criterion=criterion)
    rewind = RewindCallback(to="1ep", mode=mode)
    trainer = make_trainer(tmp_path, [prune, rewind], max_epochs=stop_epochs or 8)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, prune, rewind, trainer


@pytest.mark.parametrize(("mode", "criterion"), [("weights", "magnitude"), ("lr", "flipout")])
def test_resume_mid_round_reproduces_the_uninterrupted_run(tmp_path, mode, criterion):
    full = _resume_run(tmp_path / "full", mode, criterion=criterion)
    half = _resume_run(tmp_path / "half", mode, stop_epochs=5, criterion=criterion)
    assert len(half[2].rewinds) == 2  # stopped inside the third round
    half[3].save_checkpoint(tmp_path / "mid.ckpt")
    states = torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"]
    assert states[half[2].state_key]["snapshot"] is not None
    resumed = _resume_run(
        tmp_path / "resumed", mode, ckpt_path=tmp_path / "mid.ckpt", criterion=criterion
    )
    model_full, prune_full, rewind_full, _ = full
    model_res, prune_res, rewind_res, _ = resumed
    assert digest(rewind_res.snapshot["model"]) == digest(rewind_full.snapshot["model"])
    assert rewind_res.rewinds == rewind_full.rewinds
    assert digest(prune_res.masks.keep_masks()) == digest(prune_full.masks.keep_masks())
    if criterion == "flipout":
        assert digest(prune_res.flips.flips) == digest(prune_full.flips.flips)
    for (name, a), (_, b) in zip(
        model_full.named_parameters(), model_res.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_resume_without_a_snapshot_after_to_is_an_error(tmp_path):
    pl.seed_everything(0)
    model = ScheduledMLP()
    trainer = make_trainer(tmp_path, [iterative(start="2ep")], max_epochs=2)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    prune, rewind = iterative(start="2ep"), RewindCallback(to="1ep")
    trainer = make_trainer(tmp_path, [prune, rewind], max_epochs=3)
    with pytest.raises(ValueError, match="holds no rewind snapshot"):
        trainer.fit(ScheduledMLP(), ckpt_path=tmp_path / "plain.ckpt")


# -- per-layer rates, rounds ---------------------------------------------------------------------


def test_per_layer_rates_prune_for_the_same_number_of_rounds(tmp_path):
    prune = iterative(rate=0.2, sparsity=1 - 0.8**3, rates={"fc3": 0.1}, every="1ep")
    fit(tmp_path, [prune], max_epochs=5)
    stats = {r["layer"]: r for r in prune.layer_stats()}
    assert abs(stats["fc3.weight"]["sparsity"] - (1 - 0.9**3)) <= 1 / 64
    pooled = sum(stats[n]["numel"] - stats[n]["nonzero"] for n in WEIGHTS[:2])
    assert abs(pooled - round((1 - 0.8**3) * 1536)) <= 1


def test_rounds_record_sparsity_and_the_monitored_metric(tmp_path):
    prune = iterative(monitor="val_loss")
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, [prune], max_epochs=3, limit_val_batches=2, logger=logger)
    assert [r["round"] for r in prune.rounds] == [0, 1, 2]
    assert [round(r["sparsity"], 3) for r in prune.rounds] == [0.0, 0.5, 0.75]
    assert all("val_loss" in r for r in prune.rounds)
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "prune/round/val_loss" in text and "prune/round/sparsity" in text


def test_wandb_gets_accuracy_against_remaining_weights(tmp_path, monkeypatch):
    import wandb

    logger, logged = offline_wandb(tmp_path, monkeypatch)
    prune = iterative(monitor="val_loss")
    fit(tmp_path, [prune], max_epochs=3, limit_val_batches=2, logger=logger)
    logger.experiment.finish()
    (rounds,) = [d for d in logged if "prune/rounds" in d]
    assert isinstance(rounds["prune/rounds"], wandb.Table)
    assert [row[0] for row in rounds["prune/rounds"].data] == [0, 1, 2]
    assert "prune/rounds_plot" in rounds


def test_rounds_follow_the_optimizer_clock_under_gradient_accumulation(tmp_path):
    # 8 batches per epoch accumulated by 2: 4 optimizer steps per epoch, rounds at steps 4 and 8.
    prune, rewind = iterative(), Recording(to=0, mode="lr")
    _model, trainer = fit(tmp_path, [prune, rewind], max_epochs=3, accumulate_grad_batches=2)
    assert rewind.rewinds == [4, 8]
    assert trainer.global_step == 12
    assert all(after["lr"] == pytest.approx(0.1) for after in rewind.after)
    assert all(after["sched"]["last_epoch"] == 0 for after in rewind.after)
