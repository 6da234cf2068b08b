"""The distillation of one student by one frozen teacher, without a Trainer.

A :class:`Distiller` hooks the student's forward, runs the teacher on the same inputs (or reads
its memoized outputs), and turns the student's own loss into Hinton et al.'s mixture plus the
feature-matching terms, training the adapters those need. ``DistillationCallback`` drives it from
Lightning's hooks; a plain training loop can drive it the same way::

    distiller = Distiller(DistillConfig(teacher=teacher, features=[("fc1", "fc1")]))
    distiller.attach(student)
    with distiller.capture() as forward:
        logits = student(x)
    loss, stats = distiller.loss(forward, F.cross_entropy(logits, y))
    loss.backward()
    optimizer.step()
    distiller.step_adapters()
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.distillation.capture import (
    TeacherMemo,
    example_fingerprints,
    first_tensor,
    logits_of,
    make_adapter,
)
from lightning_compress.distillation.config import DistillConfig
from lightning_compress.distillation.losses import agreement, feature_loss, kd_loss
from lightning_compress.distillation.teacher import load_teacher, teacher_digest


def _module_named(root: nn.Module, name: str, arg: str, whose: str) -> nn.Module:
    modules = dict(root.named_modules())
    if name not in modules:
        names = [n for n in modules if n][:12]
        raise ValueError(
            f"`{arg}` names {name!r}, which is not a module of the {whose}; its modules "
            f"include {names}"
        )
    return modules[name]


def _feature(
    captured: Mapping[str, torch.Tensor | None], layer: str, whose: str, forward: str
) -> torch.Tensor:
    feature = captured.get(layer)
    if feature is None:
        raise RuntimeError(
            f"DistillationCallback: {whose} layer {layer!r} did not produce a tensor in {forward}"
        )
    return feature


@dataclasses.dataclass
class Forward:
    """What the first student forward inside :meth:`Distiller.capture` left behind.

    Attributes:
        call: The student's ``(args, kwargs, output)``; None until its forward ran.
        features: Outputs of the student's feature layers, by layer name.
    """

    call: tuple[Any, Mapping[str, Any], Any] | None = None
    features: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)


class RunningMeans:
    """Example-weighted means of per-batch statistics (an epoch's, in the callback)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, stats: Mapping[str, torch.Tensor], n: int) -> None:
        for name, value in stats.items():
            weighted = value.float() * n
            self.sums[name] = weighted + self.sums[name] if name in self.sums else weighted
        self.count += n

    def means(self) -> dict[str, torch.Tensor]:
        if not self.count:
            return {}
        return {name: total / self.count for name, total in self.sums.items()}


class Distiller:
    """Hinton et al.'s loss for a student module, from a frozen teacher, plus feature matching.

    The mixed loss is::

        (1 - alpha) * loss + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
                           + sum_i weight_i * MSE(adapter_i(student_feature_i), teacher_feature_i)

    Adapters (see :func:`~lightning_compress.distillation.capture.make_adapter`) are made at the
    first :meth:`loss`, when the features' shapes are known, and trained by an own Adam
    (``config.adapter_lr``) that :meth:`step_adapters` steps.

    Args:
        config: The settings; its ``teacher`` is built in :meth:`attach` unless it is a module.

    Attributes:
        teacher: The frozen teacher module (None until :meth:`attach` builds one from a config
            or a path).
        teacher_sha256: Digest of the teacher's weights, set by :meth:`attach`.
        adapters: The feature adapters by the index of their ``features`` entry.
        adapter_optimizer: Their Adam, once there are adapters.
        memo: Teacher outputs by example (``precompute``), from :meth:`start_fit` on.
        epoch_stats: Running means of the parts of the loss since :meth:`start_epoch`.
        steps: Number of :meth:`loss` calls so far.
    """

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.teacher: nn.Module | None = (
            config.teacher if isinstance(config.teacher, nn.Module) else None
        )
        self.teacher_sha256: str | None = None
        self.adapters = nn.ModuleDict()
        self.adapter_optimizer: torch.optim.Optimizer | None = None
        self.memo: TeacherMemo | None = None
        self.steps = 0
        self.epoch_stats = RunningMeans()
        self._adapters_made = False
        self._loaded: dict[str, Any] | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # Set only while capture() (the student's step) or the teacher's forward is running.
        self._forward: Forward | None = None
        self._teacher_features: dict[str, torch.Tensor | None] | None = None
        self._memo_warned = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def attach(self, module: nn.Module) -> None:
        """Builds and freezes the teacher and hooks the student and the feature layers.

        Args:
            module: The student's training module; ``config.student`` and the student layers of
                ``config.features`` are named from it.

        Raises:
            ValueError: An unknown layer name, a teacher that is part of ``module``, a teacher
                checkpoint that cannot be loaded.
        """
        self.detach()
        config = self.config
        if self.teacher is None or config.teacher_checkpoint is not None:
            self.teacher = load_teacher(
                config.teacher, config.teacher_checkpoint, config.teacher_class
            )
        teacher = self.teacher
        student_modules = set(map(id, module.modules()))
        student_params = set(map(id, module.parameters()))
        if id(teacher) in student_modules or any(
            id(p) in student_params for p in teacher.parameters()
        ):
            raise ValueError(
                "the teacher is (or shares parameters with) a part of the LightningModule; its "
                "optimizer and the other callbacks would change it. Keep the teacher outside "
                "the module and give it to DistillationCallback only"
            )
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher_sha256 = teacher_digest(teacher)
        root = (
            module
            if config.student is None
            else _module_named(module, config.student, "student", "LightningModule")
        )
        self._hooks.append(root.register_forward_hook(self._on_student, with_kwargs=True))
        for i, (s_name, t_name, _) in enumerate(config.features):
            s_layer = _module_named(module, s_name, f"features[{i}]", "LightningModule")
            t_layer = _module_named(teacher, t_name, f"features[{i}]", "teacher")
            self._hooks.append(s_layer.register_forward_hook(self._student_feature(s_name)))
            self._hooks.append(t_layer.register_forward_hook(self._teacher_feature(t_name)))
        self._check_teacher()

    def detach(self) -> None:
        """Removes the hooks :meth:`attach` put on the student and the teacher."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def to(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """The teacher to the student's device and floating dtype, the adapters to the device."""
        assert self.teacher is not None, "attach() builds the teacher"
        self.teacher.to(device=device, dtype=dtype)
        self.adapters.to(device)

    def start_fit(self, examples: int | None) -> None:
        """A new memo of teacher outputs (with ``precompute``): the teacher may have changed.

        Args:
            examples: Size of the training set, the most examples the memo holds (None: no limit).
        """
        if self.config.precompute:
            self.memo = TeacherMemo(examples)

    def start_epoch(self) -> None:
        """Starts the epoch's running means and memo counts."""
        self.epoch_stats = RunningMeans()
        if self.memo is not None:
            self.memo.reset_counts()

    def memo_hit_rate(self, epoch: int) -> float | None:
        """Fraction of this epoch's examples found in the memo (None: no memo, no examples).

        Warns, once, when examples did not fit in the full memo: the training set is not fixed.
        """
        memo = self.memo
        if memo is None or not memo.hits + memo.misses:
            return None
        if memo.dropped and not self._memo_warned:
            self._memo_warned = True
            warnings.warn(
                f"DistillationCallback(precompute=True): {memo.misses} of "
                f"{memo.hits + memo.misses} examples in epoch {epoch} were not in the full memo "
                "of teacher outputs; the training set is not fixed (random augmentation?), so "
                "those steps run the teacher. Use precompute=False for augmented data",
                stacklevel=3,
            )
        return memo.hits / (memo.hits + memo.misses)

    # -- one step ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[Forward]:
        """Records the first student forward run inside, for :meth:`loss`."""
        forward = self._forward = Forward()
        try:
            yield forward
        finally:
            self._forward = None

    def loss(
        self, forward: Forward, loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distilled loss of one step, and its parts; adds them to :attr:`epoch_stats`.

        Args:
            forward: What :meth:`capture` recorded of the student's forward.
            loss: The student's own loss on the batch, weighted by ``1 - alpha``.

        Returns:
            The loss to minimize, and its parts (detached): ``hard_loss``, ``kd_loss``,
            ``agreement`` and, with features, ``feature_loss``.

        Raises:
            RuntimeError: The student's forward (or a feature layer) did not run.
            ValueError: Teacher logits or features whose shapes do not match the student's.
        """
        config = self.config
        if forward.call is None:
            where = "the LightningModule's" if config.student is None else f"{config.student!r}'s"
            raise RuntimeError(
                f"DistillationCallback: training_step did not call {where} forward, so there "
                "are no student logits to distill; call it (e.g. `self(x)`) or name the "
                "submodule that produces the logits with `student=`"
            )
        args, kwargs, output = forward.call
        student = logits_of(output, "the student's forward")
        teacher_out = self._teacher_outputs(args, kwargs, student.shape[0])
        teacher = teacher_out["logits"]
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher logits of shape {tuple(teacher.shape)} do not match the student's "
                f"{tuple(student.shape)}: the teacher must predict the same classes for the "
                "same batch"
            )
        kd = kd_loss(student, teacher, config.temperature, config.class_dim)
        total = (1.0 - config.alpha) * loss + config.alpha * kd
        stats = {
            "hard_loss": loss.detach(),
            "kd_loss": kd.detach(),
            "agreement": agreement(student, teacher, config.class_dim),
        }
        if config.features:
            feat = self._feature_loss(forward.features, teacher_out, student.device)
            total = total + feat
            stats["feature_loss"] = feat.detach()
        self.epoch_stats.add(stats, student.shape[0])
        self.steps += 1
        return total, stats

    def step_adapters(
        self, step: Callable[[torch.optim.Optimizer, Iterable[torch.Tensor]], None] | None = None
    ) -> None:
        """One step of the adapters' optimizer, after each step of the student's.

        Args:
            step: Takes the optimizer and the adapters' parameters and steps it (the callback
                averages gradients across ranks first); None: a plain step, then zero_grad.
        """
        optimizer = self.adapter_optimizer
        if optimizer is None:
            return
        if step is not None:
            step(optimizer, self.adapters.parameters())
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # -- checkpoint state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The teacher's digest, the adapters and their optimizer (tensors and primitives)."""
        return {
            "teacher_sha256": self.teacher_sha256,
            "adapters": {k: v.detach().cpu() for k, v in self.adapters.state_dict().items()},
            "adapter_optimizer": (
                self.adapter_optimizer.state_dict() if self.adapter_optimizer else None
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the adapters now if they exist, else when they are made at the first step.

        Warns when the saved teacher digest differs from this teacher's.
        """
        self._loaded = dict(state)
        self._check_teacher()
        if self._adapters_made:
            self._restore_adapters()

    # -- internals ---------------------------------------------------------------------------------

    def _on_student(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._forward is not None and self._forward.call is None:
            self._forward.call = (args, kwargs, output)

    def _student_feature(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._forward is not None and self._forward.call is None:
                self._forward.features.setdefault(name, first_tensor(output))

        return hook

    def _teacher_feature(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._teacher_features is not None:
                self._teacher_features.setdefault(name, first_tensor(output))

        return hook

    def _teacher_outputs(self, args: Any, kwargs: Any, batch_size: int) -> dict[str, torch.Tensor]:
        """The teacher's logits (``"logits"``) and features (``"t:<layer>"``) on the inputs."""
        keys = None
        if self.memo is not None:
            keys = example_fingerprints(args, kwargs, batch_size)
            found = self.memo.lookup(keys)
            if found is not None:
                return found
        teacher = self.teacher
        assert teacher is not None, "attach() builds the teacher"
        if teacher.training:  # something switched it to train mode: the teacher stays in eval
            teacher.eval()
        features = self._teacher_features = {}
        try:
            with torch.no_grad():
                output = teacher(*args, **kwargs)
        finally:
            self._teacher_features = None
        result = {"logits": logits_of(output, "the teacher's forward").detach()}
        for _, t_name, _ in self.config.features:
            result[f"t:{t_name}"] = _feature(features, t_name, "teacher", "the teacher's forward")
        if self.memo is not None and keys is not None:
            bad = [n for n, t in result.items() if t.dim() == 0 or t.shape[0] != batch_size]
            if bad:
                raise ValueError(
                    f"precompute=True needs teacher outputs with the batch first; {bad} are not"
                )
            self.memo.insert(keys, result)
        return result

    def _feature_loss(
        self,
        student_features: Mapping[str, torch.Tensor | None],
        teacher_out: Mapping[str, torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        pairs = [
            (
                _feature(student_features, s_name, "student", "the training step's forward"),
                teacher_out[f"t:{t_name}"],
                weight,
            )
            for s_name, t_name, weight in self.config.features
        ]
        if not self._adapters_made:
            self._make_adapters(pairs)
        total = torch.zeros((), device=device)
        for i, (s_feat, t_feat, weight) in enumerate(pairs):
            if str(i) in self.adapters:
                adapter = self.adapters[str(i)]
                s_feat = adapter(s_feat.to(adapter.weight.dtype))
            if s_feat.shape != t_feat.shape:
                raise ValueError(
                    f"features[{i}]: the student feature's shape changed to "
                    f"{tuple(s_feat.shape)} against the teacher's {tuple(t_feat.shape)}"
                )
            total = total + weight * feature_loss(s_feat, t_feat)
        return total

    def _make_adapters(self, pairs: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Makes every adapter (and restores resumed ones) before any of them is used, so that
        loading cannot change a weight autograd has recorded."""
        for i, ((s_feat, t_feat, _), (s_name, t_name, _)) in enumerate(
            zip(pairs, self.config.features, strict=True)
        ):
            what = f"features[{i}] ({s_name} -> {t_name})"
            adapter = make_adapter(s_feat.shape, t_feat.shape, what, seed=i)
            if adapter is not None:
                self.adapters[str(i)] = adapter.to(s_feat.device)
        if len(self.adapters):
            self.adapter_optimizer = torch.optim.Adam(
                self.adapters.parameters(), lr=self.config.adapter_lr
            )
        self._adapters_made = True
        if self._loaded is not None:
            self._restore_adapters()

    def _check_teacher(self) -> None:
        saved = (self._loaded or {}).get("teacher_sha256")
        if saved is not None and self.teacher_sha256 is not None and saved != self.teacher_sha256:
            warnings.warn(
                "DistillationCallback: the teacher's weights differ from those of the run that "
                "wrote the checkpoint; the resumed run distills from a different teacher",
                stacklevel=4,
            )

    def _restore_adapters(self) -> None:
        state = self._loaded or {}
        adapters = state.get("adapters") or {}
        if adapters:
            try:
                self.adapters.load_state_dict(adapters, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"DistillationCallback: the checkpoint's adapters do not fit the features "
                    f"given: {err}"
                ) from err
        if state.get("adapter_optimizer") and self.adapter_optimizer is not None:
            self.adapter_optimizer.load_state_dict(state["adapter_optimizer"])
        self._loaded = None
