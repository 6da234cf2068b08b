import copy
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress import DistillationCallback, PruneCallback, QATCallback
from lightning_compress.distillation import teacher_digest

from ..helpers import TinyMLP, TinyTransformer, make_trainer, random_classification


def teacher_mlp(seed: int = 7) -> TinyMLP:
    """A trained-looking teacher: a TinyMLP with other weights than the student's."""
    torch.manual_seed(seed)
    return TinyMLP()


def fit(tmp_path, callbacks, model=None, **kwargs):
    model = model or TinyMLP()
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return model, trainer


class CountingTeacher(TinyMLP):
    """Records how often, and with which keyword arguments, the teacher ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, x, **kwargs):
        self.calls.append({"rows": x.shape[0], "training": self.training, **kwargs})
        return super().forward(x)


# -- misconfiguration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, r"`alpha` must be in \[0, 1\], got -0.1"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\], got 1.5"),
        ({"temperature": 0}, "`temperature` must be a finite number > 0, got 0"),
        ({"temperature": -2.0}, "`temperature` must be a finite number > 0"),
        ({"temperature": float("nan")}, "`temperature` must be a finite number > 0"),
        ({"temperature": "4"}, "`temperature` must be a number"),
        ({"features": "fc1"}, "`features` must be a list"),
        ({"features": [("fc1",)]}, r"each `features` entry must be"),
        ({"features": [("fc1", "fc1", -1.0)]}, "`features` weight must be a number >= 0"),
        ({"features": [{"student": "fc1"}]}, "needs 'student' and 'teacher'"),
        ({"adapter_lr": 0}, "`adapter_lr` must be > 0"),
        ({"teacher": None}, "`teacher` is required"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    args = {"teacher": teacher_mlp(), **kwargs}
    with pytest.raises(ValueError, match=match):
        DistillationCallback(**args)


def test_state_key_is_the_one_old_checkpoints_were_written_under():
    assert DistillationCallback(teacher_mlp()).state_key == (
        "DistillationCallback{'temperature': 4.0, 'alpha': 0.9, 'student': None}"
    )
    distill = DistillationCallback(teacher_mlp(), temperature=2, alpha=1, student="net")
    assert distill.state_key == (
        "DistillationCallback{'temperature': 2.0, 'alpha': 1.0, 'student': 'net'}"
    )


def test_settings_are_read_from_the_validated_config():
    distill = DistillationCallback(teacher_mlp(), temperature=2, features=[("fc1", "fc1")])
    assert distill.temperature == 2.0 and isinstance(distill.temperature, float)
    assert distill.features == (("fc1", "fc1", 1.0),)
    assert distill.config.precompute is False and distill.adapter_lr == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"features": [("fc9", "fc1")]},
            "`features\\[0\\]` names 'fc9', which is not a module of ",
        ),
        ({"features": [("fc1", "fc9")]}, "'fc9', which is not a module of the teacher"),
        ({"student": "encoder"}, "`student` names 'encoder'"),
    ],
)
def test_unknown_layer_names_raise_before_the_first_step(tmp_path, kwargs, match):
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, [DistillationCallback(teacher_mlp(), **kwargs)], model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_teacher_inside_the_module_is_refused(tmp_path):
    model = TinyMLP()
    model.teacher = teacher_mlp()
    with pytest.raises(ValueError, match=r"the teacher is .* a part of the LightningModule"):
        fit(tmp_path, [DistillationCallback(model.teacher)], model=model)


def test_teacher_with_other_classes_fails_before_any_optimizer_step(tmp_path):
    class FiveClasses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 5)

        def forward(self, x):
            return self.fc(x)

    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=r"teacher logits of shape \(8, 5\) do not match .*\(8, 4\)"
    ):
        fit(tmp_path, [DistillationCallback(FiveClasses())], model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_corrupt_and_mismatched_checkpoints_raise_in_setup(tmp_path):
    make = lambda ckpt: DistillationCallback(teacher_mlp(), teacher_checkpoint=ckpt)  # noqa: E731
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fit(tmp_path, [make(tmp_path / "missing.ckpt")])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="cannot be loaded"):
        fit(tmp_path, [make(junk)])
    other = tmp_path / "other.safetensors"
    save_file({"layer.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(
        ValueError, match=r"does not match the teacher module: missing \['fc1.bias'"
    ):
        fit(tmp_path, [make(other)])
    with pytest.raises(ValueError, match="give its `teacher_class`"):
        fit(tmp_path, [DistillationCallback(str(other))])


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LC_PAYLOAD_MARK']}",))


def test_pickle_payload_in_a_teacher_checkpoint_is_not_executed(tmp_path, monkeypatch):
    mark = tmp_path / "executed"
    monkeypatch.setenv("LC_PAYLOAD_MARK", str(mark))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"fc1.weight": torch.zeros(1)}, "x": Payload()}, evil)
    with pytest.raises(ValueError, match="cannot be loaded"):
        fit(tmp_path, [DistillationCallback(teacher_mlp(), teacher_checkpoint=evil)])
    assert not mark.exists()


# -- the loss --------------------------------------------------------------------------------------


class LossRecorder(Callback):
    """Recomputes the expected loss independently at each backward and keeps both."""

    def __init__(self, teacher, temperature, alpha):
        self.teacher, self.t, self.alpha = teacher, temperature, alpha
        self.pairs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        x, y = self.batch
        with torch.no_grad():
            s = pl_module(x)
            t = self.teacher(x)
            p_t = F.softmax(t / self.t, dim=1)
            kl = (p_t * (F.log_softmax(t / self.t, 1) - F.log_softmax(s / self.t, 1))).sum(1)
            hard = F.cross_entropy(s, y)
            expected = (1 - self.alpha) * hard + self.alpha * self.t**2 * kl.mean()
        self.pairs.append((float(loss.detach()), float(expected)))


def test_loss_is_hintons_mixture_of_hard_loss_and_softened_kl(tmp_path):
    teacher = teacher_mlp()
    recorder = LossRecorder(teacher, temperature=3.0, alpha=0.7)
    distill = DistillationCallback(teacher, temperature=3.0, alpha=0.7)
    fit(tmp_path, [distill, recorder], max_epochs=1)
    assert len(recorder.pairs) == 8
    for got, expected in recorder.pairs:
        assert got == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_trains_exactly_like_no_callback(tmp_path):
    pl.seed_everything(3)
    plain, _ = fit(tmp_path / "plain", [])
    distill = DistillationCallback(teacher_mlp(), alpha=0.0)
    pl.seed_everything(3)
    distilled, _ = fit(tmp_path / "kd", [distill])
    for (name, a), (_, b) in zip(
        plain.named_parameters(), distilled.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_student_learns_the_teachers_function(tmp_path):
    teacher = teacher_mlp()
    pl.seed_everything(0)
    student, trainer = fit(
        tmp_path, [DistillationCallback(teacher, alpha=1.0, temperature=1.0)], max_epochs=15
    )
    x = random_classification(n=256, seed=5).tensors[0]
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    untrained = TinyMLP()
    with torch.no_grad():
        before = (untrained(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.9 > before
    for key in ("distill/hard_loss", "distill/kd_loss", "distill/agreement"):
        assert key in trainer.callback_metrics, key
    assert 0.9 < float(trainer.callback_metrics["distill/agreement"]) <= 1.0
    assert "distill/kd_loss_step" in trainer.callback_metrics  # every log_every_n_steps batches


# -- users' modules --------------------------------------------------------------------------------


class KwargTeacher(TinyTransformer):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def forward(self, tokens, *, pool="mean"):
        self.seen.append(pool)
        return super().forward(tokens, pool=pool)


class DictStepTransformer(TinyTransformer):
    """Dict batches, a keyword-only forward argument and a training_step returning a dict."""

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["tokens"], pool="first"), batch["label"])
        return {"loss": loss, "extra": loss.detach()}


def test_dict_batches_keyword_arguments_and_dict_outputs(tmp_path):
    torch.manual_seed(1)
    teacher = KwargTeacher()
    digest = teacher_digest(teacher)
    torch.manual_seed(2)
    model = DictStepTransformer()
    before = copy.deepcopy(model.state_dict())
    _, trainer = fit(tmp_path, [DistillationCallback(teacher)], model=model, max_epochs=2)
    assert trainer.global_step == 8
    assert set(teacher.seen) == {"first"}  # the teacher got the student's keyword argument
    assert len(teacher.seen) == 8
    assert teacher_digest(teacher) == digest and not teacher.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "distill/kd_loss" in trainer.callback_metrics


class CallsTheNetDirectly(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyMLP()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(random_classification(), batch_size=8)


def test_student_submodule_when_training_step_bypasses_forward(tmp_path):
    with pytest.raises(RuntimeError, match="training_step did not call the LightningModule's"):
        fit(tmp_path, [DistillationCallback(teacher_mlp())], model=CallsTheNetDirectly())
    _, trainer = fit(
        tmp_path, [DistillationCallback(teacher_mlp(), student="net")], model=CallsTheNetDirectly()
    )
    assert trainer.global_step == 32
    assert "distill/kd_loss" in trainer.callback_metrics


def test_teacher_untouched_by_pruning_and_qat_and_frozen(tmp_path):
    teacher = CountingTeacher()
    digest = teacher_digest(teacher)
    callbacks = [
        PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep"),
        QATCallback(bits=4),
        DistillationCallback(teacher),
    ]
    model, _ = fit(tmp_path, callbacks, max_epochs=2)
    assert teacher_digest(teacher) == digest
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(int((p == 0).sum()) == 0 for p in teacher.parameters())
    assert all(not call["training"] for call in teacher.calls) and len(teacher.calls) == 16
    assert float((model.fc1.weight == 0).float().mean()) >= 0.49  # the student was pruned


def test_hooks_and_training_step_restored_after_fit(tmp_path):
    distill = DistillationCallback(teacher_mlp())
    model, _ = fit(tmp_path, [distill], max_epochs=1)
    assert "training_step" not in model.__dict__
    assert not model._forward_hooks and not model._forward_hooks_with_kwargs
    trainer = make_trainer(tmp_path, [distill], max_epochs=1)
    trainer.fit(model)  # a second fit with the same callback
    assert trainer.global_step == 8


def test_gradient_accumulation_and_per_step_scheduler(tmp_path):
    teacher = teacher_mlp()
    recorder = LossRecorder(teacher, temperature=2.0, alpha=0.5)
    distill = DistillationCallback(teacher, temperature=2.0, alpha=0.5)
    _, trainer = fit(tmp_path, [distill, recorder], max_epochs=1, accumulate_grad_batches=4)
    assert trainer.global_step == 2
    for got, expected in recorder.pairs:  # Lightning divides the returned loss by 4
        assert got == pytest.approx(expected / 4, rel=1e-5)


# -- features and adapters -------------------------------------------------------------------------


class WideTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_feature_matching_trains_an_adapter_when_shapes_differ(tmp_path):
    distill = DistillationCallback(
        WideTeacher(), features=[("fc1", "fc1", 0.5), {"student": "fc3", "teacher": "fc2"}]
    )
    fit(tmp_path, [distill], max_epochs=1)
    assert set(distill.adapters) == {"0"}  # fc1: 32 -> 48 needs one; fc3/fc2 match
    adapter = distill.adapters["0"]
    assert isinstance(adapter, nn.Linear) and tuple(adapter.weight.shape) == (48, 32)
    first = adapter.weight.detach().clone()
    trainer = make_trainer(tmp_path, [distill], max_epochs=2)
    trainer.fit(TinyMLP())
    assert not torch.equal(first, distill.adapters["0"].weight)
    assert "distill/feature_loss" in trainer.callback_metrics
    state = distill.state_dict()
    assert set(state["adapters"]) == {"0.weight", "0.bias"}
    assert state["adapter_optimizer"]["state"]


def test_incompatible_feature_shapes_raise_before_the_first_step(tmp_path):
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    # The student's fc1 output (8, 32) and the teacher's input-shaped conv are not adaptable.
    teacher = nn.Sequential(
        nn.Unflatten(1, (1, 32)), nn.Conv1d(1, 3, 3), nn.Flatten(), nn.LazyLinear(4)
    )
    teacher(torch.zeros(1, 32))
    distill = DistillationCallback(teacher, features=[("fc1", "1")])
    with pytest.raises(ValueError, match=r"cannot be adapted to the teacher's \(8, 3, 30\)"):
        fit(tmp_path, [distill], model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- resume ----------------------------------------------------------------------------------------


def _resume_run(tmp_path, stop=None, ckpt=None, precompute=False):
    pl.seed_everything(5)
    model = TinyMLP()
    distill = DistillationCallback(
        WideTeacher(), temperature=2.0, features=[("fc1", "fc1", 0.1)], precompute=precompute
    )
    trainer = make_trainer(tmp_path, [distill], max_epochs=stop or 4)
    trainer.fit(model, ckpt_path=ckpt)
    return model, distill, trainer


@pytest.mark.parametrize("precompute", [False, True])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, precompute):
    full_model, full, _ = _resume_run(tmp_path / "full", precompute=precompute)
    _, _, half = _resume_run(tmp_path / "half", stop=2, precompute=precompute)
    half.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)  # tensors and primitives only
    assert any("DistillationCallback" in k for k in state["callbacks"])
    model, resumed, _ = _resume_run(
        tmp_path / "resumed", ckpt=tmp_path / "mid.ckpt", precompute=precompute
    )
    for (name, a), (_, b) in zip(
        full_model.named_parameters(), model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    for key, value in full.adapters.state_dict().items():
        assert torch.allclose(value, resumed.adapters.state_dict()[key], atol=1e-6, rtol=0), key


def test_state_has_a_version_and_newer_versions_are_refused(tmp_path):
    _, distill, trainer = _resume_run(tmp_path, stop=1)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)["callbacks"][distill.state_key]
    assert state["version"] == 1
    assert set(state) == {
        "version",
        "temperature",
        "alpha",
        "teacher_sha256",
        "adapters",
        "adapter_optimizer",
    }
    fresh = DistillationCallback(WideTeacher(), temperature=2.0, features=[("fc1", "fc1", 0.1)])
    fresh.load_state_dict({k: v for k, v in state.items() if k != "version"})  # before versions
    with pytest.raises(ValueError, match="has version 2; this release reads versions up to 1"):
        fresh.load_state_dict({**state, "version": 2})


def test_resume_with_another_teacher_warns(tmp_path):
    _, _, half = _resume_run(tmp_path / "half", stop=1)
    half.save_checkpoint(tmp_path / "mid.ckpt")
    distill = DistillationCallback(teacher_mlp(3), temperature=2.0)
    trainer = make_trainer(tmp_path, [distill], max_epochs=2)
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    key = next(k for k in state["callbacks"] if "DistillationCallback" in k)
    distill.load_state_dict({**state["callbacks"][key], "adapters": {}, "adapter_optimizer": None})
    with pytest.warns(UserWarning, match="the teacher's weights differ"):
        trainer.fit(TinyMLP())


# -- precomputed teacher outputs -------------------------------------------------------------------


def test_precompute_runs_the_teacher_only_in_the_first_epoch(tmp_path):
    teacher = CountingTeacher()
    twin = copy.deepcopy(teacher)
    pl.seed_everything(0)
    with warnings.catch_warnings():  # the first epoch's misses fill the memo: no warning
        warnings.filterwarnings("error", message=".*not in the full memo")
        memo_model, trainer = fit(tmp_path, [DistillationCallback(teacher, precompute=True)])
    assert len(teacher.calls) == 8  # 64 examples, batches of 8, first epoch only; 4 epochs ran
    assert trainer.global_step == 32
    assert float(trainer.callback_metrics["distill/memo_hit_rate"]) == 1.0
    pl.seed_everything(0)
    plain_model, _ = fit(tmp_path, [DistillationCallback(twin, precompute=False)])
    for (name, a), (_, b) in zip(
        memo_model.named_parameters(), plain_model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


class Augmented(Dataset):
    def __init__(self):
        self.data = random_classification()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.01 * torch.randn_like(x), y


class AugmentedMLP(TinyMLP):
    def train_dataloader(self):
        return DataLoader(Augmented(), batch_size=8, shuffle=True)


def test_precompute_warns_on_augmented_data_and_stays_bounded(tmp_path):
    teacher = CountingTeacher()
    distill = DistillationCallback(teacher, precompute=True)
    with pytest.warns(UserWarning, match="the training set is not fixed"):
        fit(tmp_path, [distill], model=AugmentedMLP(), max_epochs=3)
    assert len(distill.distiller.memo) == 64  # never more examples than the dataset has
    assert len(teacher.calls) == 24  # every step ran the teacher: outputs stay correct


# -- teachers from files and configs ---------------------------------------------------------------


class SavedTeacher(pl.LightningModule):
    def __init__(self, width: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x):
        return self.net(x)


def test_teacher_from_a_lightning_checkpoint_with_its_class(tmp_path):
    torch.manual_seed(4)
    source = SavedTeacher(width=24)
    trainer = make_trainer(tmp_path, [], max_epochs=0)
    trainer.strategy.connect(source)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    for cls in (SavedTeacher, f"{__name__}.SavedTeacher"):
        distill = DistillationCallback(str(tmp_path / "teacher.ckpt"), teacher_class=cls)
        fit(tmp_path, [distill], max_epochs=1)
        assert teacher_digest(distill.teacher) == teacher_digest(source)
        assert distill.teacher.hparams.width == 24


def test_teacher_from_a_config_and_a_prefixed_safetensors_file(tmp_path):
    torch.manual_seed(4)
    source = SavedTeacher(width=8)
    path = tmp_path / "t.safetensors"  # keys "net.0.weight", ...: the module's, not the net's
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    fresh = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    fit(tmp_path, [DistillationCallback(fresh, teacher_checkpoint=path)], max_epochs=1)
    assert teacher_digest(fresh) == teacher_digest(source.net)
    built = DistillationCallback(
        {"_target_": "torch.nn.Linear", "in_features": 32, "out_features": 4}
    )
    fit(tmp_path, [built], max_epochs=1)
    assert isinstance(built.teacher, nn.Linear)
