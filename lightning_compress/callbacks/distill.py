"""DistillationCallback: teacher-student training added to an existing Trainer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks._side_optimizer import averaged_step
from lightning_compress.distillation import (
    TeacherMemo,
    agreement,
    example_fingerprints,
    feature_loss,
    kd_loss,
    load_teacher,
    logits_of,
    make_adapter,
    teacher_digest,
)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def _parse_features(features: Any) -> list[tuple[str, str, float]]:
    if features is None:
        return []
    if isinstance(features, (str, Mapping)) or not isinstance(features, Sequence):
        raise ValueError(
            "`features` must be a list of (student_layer, teacher_layer[, weight]) pairs or of "
            f"{{student, teacher, weight}} mappings, got {features!r}"
        )
    pairs = []
    for item in features:
        if isinstance(item, Mapping):
            unknown = set(item) - {"student", "teacher", "weight"}
            if unknown or "student" not in item or "teacher" not in item:
                raise ValueError(
                    "a `features` mapping needs 'student' and 'teacher' (and optionally "
                    f"'weight'), got {dict(item)!r}"
                )
            student, teacher, weight = item["student"], item["teacher"], item.get("weight", 1.0)
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
            student, teacher, weight = (*item, 1.0)[:3]
        else:
            raise ValueError(
                f"each `features` entry must be (student_layer, teacher_layer[, weight]), got "
                f"{item!r}"
            )
        if not isinstance(student, str) or not isinstance(teacher, str):
            raise ValueError(f"`features` layer names must be strings, got {item!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"`features` weight must be a number >= 0, got {weight!r}")
        pairs.append((student, teacher, float(weight)))
    return pairs


def _module_named(root: nn.Module, name: str, arg: str, whose: str) -> nn.Module:
    modules = dict(root.named_modules())
    if name not in modules:
        names = [n for n in modules if n][:12]
        raise ValueError(
            f"`{arg}` names {name!r}, which is not a module of the {whose}; its modules "
            f"include {names}"
        )
    return modules[name]


class DistillationCallback(Callback):
    """Trains the model as a student of a frozen teacher (Hinton et al. 2015).

    The loss the LightningModule's ``training_step`` returns becomes::

        (1 - alpha) * loss + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
                           + sum_i weight_i * MSE(adapter_i(student_feature_i), teacher_feature_i)

    What the callback assumes about the LightningModule (which it does not change):

    * ``training_step`` calls the student's ``forward`` (by default the LightningModule's own,
      i.e. ``self(...)``; ``student="model"`` names a submodule instead) once on the batch, and
      that forward's output holds the logits: a tensor, a mapping with ``"logits"``, an object
      with ``.logits``, or a tuple whose first element is the logits. If it is called several
      times in one step, the first call is the one distilled.
    * The teacher accepts the same positional and keyword arguments as that forward and returns
      logits of the same shape; classes lie along ``class_dim``.
    * ``training_step`` returns the loss as a tensor or as a mapping with ``"loss"`` (returning
      None skips the batch, as in Lightning). Its whole returned loss is weighted by
      ``1 - alpha``. Automatic optimization only.

    The teacher is held by the callback, not registered in the LightningModule: no optimizer
    and no other callback sees it. It is frozen (no gradients), kept in eval mode, moved to the
    student's device and floating dtype, and run under ``torch.no_grad`` on the same inputs.

    Args:
        teacher: An ``nn.Module``; a Hydra config (mapping with ``_target_``); or the path of a
            checkpoint of ``teacher_class``. Built and loaded in ``setup``, before any step.
        temperature: Softmax temperature T > 0.
        alpha: Weight of the distillation term, in [0, 1].
        features: Pairs ``(student_layer, teacher_layer[, weight])`` (or mappings with those
            keys) matched with mean squared error. Student layers are named from the
            LightningModule (``"net.fc1"``), teacher layers from the teacher. When shapes differ
            in the last or the channel dimension, a Linear or 1x1 convolution adapter maps the
            student feature; adapters are trained by the callback's own Adam (``adapter_lr``),
            stepped after every step of the model's optimizer.
        teacher_checkpoint: Weights for the teacher: ``.safetensors`` or a Lightning/torch
            checkpoint, read with ``weights_only=True`` (a leading ``net.``-style prefix is
            dropped when the teacher is a part of the checkpointed model).
        teacher_class: With a checkpoint path as ``teacher``: its class (or dotted import path).
        student: Dotted name of the submodule whose forward produces the logits (default: the
            LightningModule itself).
        class_dim: Dimension of the logits holding the classes.
        precompute: Memoize teacher outputs per training example (keyed by the exact bits of
            its inputs), so that once every example has been seen the teacher never runs. For a
            fixed training set (no random augmentation); holds at most as many examples as the
            training dataset has, and warns when examples keep missing.
        adapter_lr: Learning rate of the adapters' Adam.

    Raises:
        ValueError: An argument out of range; in ``setup``: an unknown layer name, a teacher
            that is part of the LightningModule, a checkpoint that cannot be loaded; at the
            first batch, before any optimizer step: logits or features whose shapes do not
            match.
    """

    def __init__(
        self,
        teacher: Any,
        temperature: float = 4.0,
        alpha: float = 0.9,
        features: Any = None,
        teacher_checkpoint: str | Path | None = None,
        teacher_class: type | str | None = None,
        student: str | None = None,
        class_dim: int = -1,
        precompute: bool = False,
        adapter_lr: float = 1e-3,
    ) -> None:
        if teacher is None:
            raise ValueError("`teacher` is required: an nn.Module, a config or a checkpoint path")
        for arg, value in (("temperature", temperature), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{arg}` must be a number, got {value!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        if not isinstance(class_dim, int) or isinstance(class_dim, bool):
            raise ValueError(f"`class_dim` must be an integer, got {class_dim!r}")
        if not (isinstance(adapter_lr, (int, float)) and adapter_lr > 0):
            raise ValueError(f"`adapter_lr` must be > 0, got {adapter_lr!r}")
        if student is not None and not isinstance(student, str):
            raise ValueError(f"`student` must be a submodule name or None, got {student!r}")
        self.teacher_spec = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_class = teacher_class
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.features = _parse_features(features)
        self.student = student
        self.class_dim = class_dim
        self.precompute = bool(precompute)
        self.adapter_lr = float(adapter_lr)

        self.teacher: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self.teacher_sha256: str | None = None
        self.adapters = nn.ModuleDict()
        self.memo: TeacherMemo | None = None
        self._adapter_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._original_step: Any = None
        self._capturing = False
        self._capture: dict[str, Any] = {}
        self._teacher_running = False
        self._teacher_features: dict[str, torch.Tensor] = {}
        self._memo_warned = False
        self._epoch_counts = [0, 0]
        self._adapters_made = False
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._batches = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            temperature=self.temperature, alpha=self.alpha, student=self.student
        )

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "DistillationCallback needs automatic optimization: with "
                "`automatic_optimization = False` the module runs backward itself"
            )
        if self.teacher is None or self.teacher_checkpoint is not None:
            self.teacher = load_teacher(
                self.teacher_spec, self.teacher_checkpoint, self.teacher_class
            )
        teacher = self.teacher
        student_modules = set(map(id, pl_module.modules()))
        student_params = set(map(id, pl_module.parameters()))
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
            pl_module
            if self.student is None
            else _module_named(pl_module, self.student, "student", "LightningModule")
        )
        self._remove_hooks()
        self._handles.append(root.register_forward_hook(self._on_student, with_kwargs=True))
        for i, (s_name, t_name, _) in enumerate(self.features):
            s_layer = _module_named(pl_module, s_name, f"features[{i}]", "LightningModule")
            t_layer = _module_named(teacher, t_name, f"features[{i}]", "teacher")
            self._handles.append(s_layer.register_forward_hook(self._capture_student(s_name)))
            self._handles.append(t_layer.register_forward_hook(self._capture_teacher(t_name)))
        self._patch_training_step(pl_module)
        self._check_teacher()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        self.teacher.to(device=pl_module.device, dtype=dtype)
        self.adapters.to(pl_module.device)
        for optimizer in trainer.optimizers:
            self._handles.append(
                optimizer.register_step_post_hook(lambda *_: self._step_adapters(trainer))
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.precompute:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            try:
                limit = len(dataset) if dataset is not None else None
            except TypeError:
                limit = None
            # A new memo per fit: the teacher may have been reloaded or changed in between.
            self.memo = TeacherMemo(limit)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._count = {}, 0
        if self.memo is not None:
            self._epoch_counts = [self.memo.hits, self.memo.misses]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._count:
            for name, total in self._sums.items():
                pl_module.log(f"distill/{name}", total / self._count, on_epoch=True, sync_dist=True)
        self._sums, self._count = {}, 0
        memo = self.memo
        if memo is None:
            return
        hits = memo.hits - self._epoch_counts[0]
        misses = memo.misses - self._epoch_counts[1]
        if hits + misses:
            pl_module.log("distill/memo_hit_rate", hits / (hits + misses), on_epoch=True)
        full = memo.limit is not None and len(memo) >= memo.limit
        if full and misses and not self._memo_warned:
            self._memo_warned = True
            warnings.warn(
                f"DistillationCallback(precompute=True): {misses} of {hits + misses} examples in "
                f"epoch {trainer.current_epoch} were not in the full memo of teacher outputs; "
                "the training set is not fixed (random augmentation?), so those steps run the "
                "teacher. Use precompute=False for augmented data",
                stacklevel=2,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._remove_hooks()
        if self._original_step is not None:
            if pl_module.__dict__.get("training_step") is not None:
                del pl_module.training_step
            self._original_step = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "alpha": self.alpha,
            "teacher_sha256": self.teacher_sha256,
            "adapters": {k: v.detach().cpu() for k, v in self.adapters.state_dict().items()},
            "adapter_optimizer": (
                self._adapter_optimizer.state_dict() if self._adapter_optimizer else None
            ),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"adapters", "adapter_optimizer"} - set(state_dict)
        if missing:
            raise ValueError(
                f"DistillationCallback state in the checkpoint lacks {sorted(missing)}; it was "
                "not written by this callback"
            )
        self._pending = dict(state_dict)
        self._check_teacher()
        if len(self.adapters):
            self._load_adapters()

    # -- the distilled training step ---------------------------------------------------------------

    def _patch_training_step(self, pl_module: pl.LightningModule) -> None:
        if self._original_step is not None:
            return
        original = pl_module.training_step
        self._original_step = original

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._capture = {}
            self._capturing = True
            try:
                out = original(*args, **kwargs)
            finally:
                self._capturing = False
            if out is None:
                return out
            if isinstance(out, Mapping):
                if "loss" not in out:
                    raise ValueError(
                        "DistillationCallback: training_step returned a mapping without 'loss'"
                    )
                return {**out, "loss": self._distilled(pl_module, out["loss"])}
            if torch.is_tensor(out):
                return self._distilled(pl_module, out)
            raise TypeError(
                "DistillationCallback: training_step must return a loss tensor, a mapping with "
                f"'loss', or None; got {type(out).__name__}"
            )

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _on_student(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._capturing and "student" not in self._capture:
            self._capture["student"] = (args, kwargs, output)

    def _capture_student(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._capturing and "student" not in self._capture:
                self._capture.setdefault(f"s:{name}", _first_tensor(output))

        return hook

    def _capture_teacher(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._teacher_running:
                self._teacher_features.setdefault(f"t:{name}", _first_tensor(output))

        return hook

    def _distilled(self, pl_module: pl.LightningModule, loss: torch.Tensor) -> torch.Tensor:
        if "student" not in self._capture:
            where = "the LightningModule's" if self.student is None else f"{self.student!r}'s"
            raise RuntimeError(
                f"DistillationCallback: training_step did not call {where} forward, so there "
                "are no student logits to distill; call it (e.g. `self(x)`) or name the "
                "submodule that produces the logits with `student=`"
            )
        args, kwargs, output = self._capture["student"]
        student = logits_of(output, "the student's forward")
        teacher_out = self._teacher_outputs(args, kwargs, student.shape[0])
        teacher = teacher_out["logits"]
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher logits of shape {tuple(teacher.shape)} do not match the student's "
                f"{tuple(student.shape)}: the teacher must predict the same classes for the "
                "same batch"
            )
        kd = kd_loss(student, teacher, self.temperature, self.class_dim)
        total = (1.0 - self.alpha) * loss + self.alpha * kd
        stats = {
            "hard_loss": loss.detach(),
            "kd_loss": kd.detach(),
            "agreement": agreement(student, teacher, self.class_dim),
        }
        if self.features:
            feat = self._feature_loss(teacher_out, student.device)
            total = total + feat
            stats["feature_loss"] = feat.detach()
        self._record(pl_module, stats, student.shape[0])
        return total

    def _record(self, pl_module: pl.LightningModule, stats: dict[str, torch.Tensor], n: int):
        """Running sums for the epoch means; step values only every ``log_every_n_steps``
        batches (a ``self.log`` call costs more than the distillation step itself)."""
        for name, value in stats.items():
            total = self._sums.get(name)
            self._sums[name] = value.float() * n if total is None else total + value.float() * n
        self._count += n
        self._batches += 1
        every = max(1, getattr(pl_module.trainer, "log_every_n_steps", 50))
        if self._batches % every == 0:
            for name, value in stats.items():
                pl_module.log(f"distill/{name}_step", value, on_step=True, on_epoch=False)

    def _teacher_outputs(self, args: Any, kwargs: Any, batch_size: int) -> dict[str, torch.Tensor]:
        keys = None
        if self.memo is not None:
            keys = example_fingerprints(args, kwargs, batch_size)
            found = self.memo.lookup(keys)
            if found is not None:
                return found
        teacher = self.teacher
        assert teacher is not None
        if teacher.training:  # something switched it to train mode: the teacher stays in eval
            teacher.eval()
        self._teacher_features = {}
        self._teacher_running = True
        try:
            with torch.no_grad():
                output = teacher(*args, **kwargs)
        finally:
            self._teacher_running = False
        result = {"logits": logits_of(output, "the teacher's forward").detach()}
        for _, t_name, _ in self.features:
            feature = self._teacher_features.get(f"t:{t_name}")
            if feature is None:
                raise RuntimeError(
                    f"DistillationCallback: teacher layer {t_name!r} did not produce a tensor in "
                    "the teacher's forward"
                )
            result[f"t:{t_name}"] = feature
        if self.memo is not None and keys is not None:
            bad = [n for n, t in result.items() if t.dim() == 0 or t.shape[0] != batch_size]
            if bad:
                raise ValueError(
                    f"precompute=True needs teacher outputs with the batch first; {bad} are not"
                )
            self.memo.insert(keys, result)
        return result

    def _feature_loss(self, teacher_out: dict[str, torch.Tensor], device: torch.device):
        pairs = []
        for i, (s_name, t_name, weight) in enumerate(self.features):
            s_feat = self._capture.get(f"s:{s_name}")
            if s_feat is None:
                raise RuntimeError(
                    f"DistillationCallback: student layer {s_name!r} did not produce a tensor in "
                    "the training step's forward"
                )
            pairs.append((str(i), s_feat, teacher_out[f"t:{t_name}"], weight))
        if not self._adapters_made:
            # First batch: the shapes are known now. Make every adapter (and restore resumed
            # ones) before any of them is used, so loading cannot touch a recorded weight.
            for (key, s_feat, t_feat, _), (s_name, t_name, _) in zip(
                pairs, self.features, strict=True
            ):
                what = f"features[{key}] ({s_name} -> {t_name})"
                adapter = make_adapter(s_feat.shape, t_feat.shape, what, seed=int(key))
                if adapter is not None:
                    self.adapters[key] = adapter.to(s_feat.device)
            if len(self.adapters):
                self._adapter_optimizer = torch.optim.Adam(
                    self.adapters.parameters(), lr=self.adapter_lr
                )
            if self._pending is not None:
                self._load_adapters()
            self._adapters_made = True
        total = torch.zeros((), device=device)
        for key, s_feat, t_feat, weight in pairs:
            if key in self.adapters:
                adapter = self.adapters[key]
                s_feat = adapter(s_feat.to(adapter.weight.dtype))
            if s_feat.shape != t_feat.shape:
                raise ValueError(
                    f"features[{key}]: the student feature's shape changed to "
                    f"{tuple(s_feat.shape)} against the teacher's {tuple(t_feat.shape)}"
                )
            total = total + weight * feature_loss(s_feat, t_feat)
        return total

    def _check_teacher(self) -> None:
        saved = (self._pending or {}).get("teacher_sha256")
        if saved is not None and self.teacher_sha256 is not None and saved != self.teacher_sha256:
            warnings.warn(
                "DistillationCallback: the teacher's weights differ from those of the run that "
                "wrote the checkpoint; the resumed run distills from a different teacher",
                stacklevel=3,
            )

    def _load_adapters(self) -> None:
        state = self._pending or {}
        adapters = state.get("adapters") or {}
        if adapters:
            try:
                self.adapters.load_state_dict(adapters, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"DistillationCallback: the checkpoint's adapters do not fit the features "
                    f"given: {err}"
                ) from err
        if state.get("adapter_optimizer") and self._adapter_optimizer is not None:
            self._adapter_optimizer.load_state_dict(state["adapter_optimizer"])
        self._pending = None

    def _step_adapters(self, trainer: pl.Trainer) -> None:
        """One Adam step on the adapters after each step of the model's optimizer."""
        if self._adapter_optimizer is not None:
            averaged_step(trainer, self._adapter_optimizer, self.adapters.parameters())

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
