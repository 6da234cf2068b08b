"""The Distiller on plain modules, without a Trainer."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distillation import DistillConfig, Distiller, RunningMeans


def mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 4))


class Counting(nn.Sequential):
    """A teacher that counts its forward calls."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def distill_step(distiller, student, x, y):
    with distiller.capture() as forward:
        logits = student(x)
    return distiller.loss(forward, F.cross_entropy(logits, y))


def attached(student, **config) -> Distiller:
    distiller = Distiller(DistillConfig(**config))
    distiller.attach(student)
    return distiller


def test_loss_is_hintons_mixture_and_its_parts_are_averaged_per_example():
    student, teacher = mlp(16, 0), mlp(24, 1)
    distiller = attached(student, teacher=teacher, temperature=3.0, alpha=0.7)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    kd_parts = []
    for seed, n in ((0, 8), (1, 4)):
        x, y = batch(seed, n)
        total, stats = distill_step(distiller, student, x, y)
        with torch.no_grad():
            s, t = student(x), teacher(x)
            p = F.softmax(t / 3.0, 1)
            kl = (p * (p.log() - F.log_softmax(s / 3.0, 1))).sum(1).mean()
            expected = 0.3 * F.cross_entropy(s, y) + 0.7 * 9.0 * kl
        assert total.item() == pytest.approx(expected.item(), rel=1e-5)
        assert set(stats) == {"hard_loss", "kd_loss", "agreement"}
        assert stats["kd_loss"].item() == pytest.approx(9.0 * kl.item(), rel=1e-5)
        kd_parts.append((stats["kd_loss"].item(), n))
    means = distiller.epoch_stats.means()
    weighted = sum(v * n for v, n in kd_parts) / 12
    assert means["kd_loss"].item() == pytest.approx(weighted, rel=1e-5)
    assert distiller.steps == 2
    distiller.start_epoch()
    assert distiller.epoch_stats.means() == {}


def test_only_the_first_student_forward_is_distilled_and_a_missing_one_is_named():
    student = mlp(16, 0)
    distiller = attached(student, teacher=mlp(16, 1), alpha=1.0)
    x, _ = batch(0)
    with distiller.capture() as forward:
        first = student(x)
        student(x * 2)
    assert forward.call[2] is first
    student(x)
    assert forward.call[2] is first
    with distiller.capture() as nothing:
        pass
    with pytest.raises(RuntimeError, match="training_step did not call the LightningModule's"):
        distiller.loss(nothing, torch.zeros(()))


def test_detach_removes_every_hook():
    student, teacher = mlp(16, 0), mlp(24, 1)
    distiller = attached(student, teacher=teacher, features=[("0", "0")])
    assert student._forward_hooks_with_kwargs and teacher[0]._forward_hooks
    distiller.detach()
    assert not student._forward_hooks and not student._forward_hooks_with_kwargs
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


def test_memo_runs_the_teacher_once_per_example_with_the_same_loss():
    student = mlp(16, 0)
    teacher = Counting(*mlp(16, 1))
    distiller = attached(student, teacher=teacher, precompute=True)
    distiller.start_fit(16)
    data = [batch(0), batch(1)]
    first = [distill_step(distiller, student, x, y)[0].item() for x, y in data]
    assert teacher.calls == 2 and len(distiller.memo) == 16
    assert distiller.memo_hit_rate(epoch=0) == 0.0
    distiller.start_epoch()
    again = [distill_step(distiller, student, x, y)[0].item() for x, y in data]
    assert teacher.calls == 2  # every example is in the memo
    assert again == pytest.approx(first, rel=1e-6)
    assert distiller.memo_hit_rate(epoch=1) == 1.0


def test_memo_warns_once_when_examples_do_not_fit():
    student = mlp(16, 0)
    distiller = attached(student, teacher=mlp(16, 1), precompute=True)
    distiller.start_fit(8)
    distill_step(distiller, student, *batch(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distiller.memo_hit_rate(epoch=0) == 0.0  # filled exactly: no warning
    distiller.start_epoch()
    distill_step(distiller, student, *batch(1))  # new examples, full memo
    with pytest.warns(UserWarning, match="8 of 8 examples in epoch 1 were not in the full memo"):
        distiller.memo_hit_rate(epoch=1)
    distiller.start_epoch()
    distill_step(distiller, student, *batch(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller.memo_hit_rate(epoch=2)  # once is enough


def test_features_of_equal_shapes_need_no_adapter():
    student, teacher = mlp(16, 0), mlp(16, 1)
    distiller = attached(student, teacher=teacher, alpha=0.0, features=[("0", "0", 0.5)])
    x, y = batch(0)
    total, stats = distill_step(distiller, student, x, y)
    with torch.no_grad():
        feat = 0.5 * F.mse_loss(student[0](x), teacher[0](x))
    assert stats["feature_loss"].item() == pytest.approx(feat.item(), rel=1e-6)
    assert total.item() == pytest.approx(stats["hard_loss"].item() + feat.item(), rel=1e-6)
    assert not len(distiller.adapters) and distiller.adapter_optimizer is None
    distiller.step_adapters()  # nothing to step


def test_adapter_is_made_at_the_first_step_and_trained_by_its_own_optimizer():
    student, teacher = mlp(16, 0), mlp(48, 1)
    distiller = attached(student, teacher=teacher, features=[{"student": "0", "teacher": "0"}])
    assert not len(distiller.adapters)  # shapes are known only at the first step
    x, y = batch(0)
    total, stats = distill_step(distiller, student, x, y)
    adapter = distiller.adapters["0"]
    assert isinstance(adapter, nn.Linear) and tuple(adapter.weight.shape) == (48, 16)
    with torch.no_grad():
        feat = F.mse_loss(adapter(student[0](x)), teacher[0](x))
    assert stats["feature_loss"].item() == pytest.approx(feat.item(), rel=1e-6)
    total.backward()
    assert adapter.weight.grad is not None and teacher[0].weight.grad is None
    before = adapter.weight.detach().clone()
    distiller.step_adapters()
    assert not torch.equal(before, adapter.weight) and adapter.weight.grad is None


def test_saved_adapters_are_restored_when_they_are_made():
    student, teacher = mlp(16, 0), mlp(48, 1)
    source = attached(student, teacher=teacher, features=[("0", "0")])
    for seed in range(3):
        distill_step(source, student, *batch(seed))[0].backward()
        source.step_adapters()
    state = source.state_dict()
    assert state["teacher_sha256"] == source.teacher_sha256 and state["adapter_optimizer"]
    resumed = attached(student, teacher=teacher, features=[("0", "0")])
    resumed.load_state_dict(state)
    distill_step(resumed, student, *batch(3))
    for key, value in source.adapters.state_dict().items():
        assert torch.equal(resumed.adapters.state_dict()[key], value), key
    assert resumed.adapter_optimizer.state_dict()["state"][0]["step"] == 3


def test_loading_the_state_of_another_teacher_warns():
    student = mlp(16, 0)
    state = attached(student, teacher=mlp(16, 1)).state_dict()
    other = attached(student, teacher=mlp(16, 2))
    with pytest.warns(UserWarning, match="the teacher's weights differ"):
        other.load_state_dict(state)


def test_running_means_weigh_batches_by_their_examples():
    means = RunningMeans()
    assert means.means() == {}
    means.add({"a": torch.tensor(1.0)}, 3)
    means.add({"a": torch.tensor(5.0)}, 1)
    assert means.means()["a"].item() == 2.0
