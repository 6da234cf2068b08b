"""DistillationCallback: teacher-student training added to an existing Trainer."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks._configured import ConfiguredCallback
from lightning_compress.callbacks._side_optimizer import averaged_step
from lightning_compress.distillation import DistillConfig, Distiller, Forward


class _Patched:
    """A method set on one instance, undone by ``remove()`` like a hook's handle."""

    def __init__(self, obj: Any, name: str, method: Callable[..., Any]) -> None:
        self.obj, self.name, self.method = obj, name, method
        setattr(obj, name, method)

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is self.method:
            delattr(self.obj, self.name)


def _dataset_size(trainer: pl.Trainer) -> int | None:
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


class DistillationCallback(ConfiguredCallback):
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

    The arguments are validated once into a :class:`~lightning_compress.distillation.DistillConfig`
    (``self.config``, whose fields read as attributes: ``callback.alpha``); a Trainer-free
    :class:`~lightning_compress.distillation.Distiller` (``self.distiller``) does the work, which
    the hooks drive. ``callback.teacher`` is the built teacher module, ``config.teacher`` what
    was given.

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
            training dataset has, and warns when new examples keep coming once it is full.
        adapter_lr: Learning rate of the adapters' Adam.

    Raises:
        ValueError: An argument out of range; in ``setup``: an unknown layer name, a teacher
            that is part of the LightningModule, a checkpoint that cannot be loaded; at the
            first batch, before any optimizer step: logits or features whose shapes do not
            match.
    """

    config: DistillConfig

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
        self.config = DistillConfig(
            teacher=teacher,
            temperature=temperature,
            alpha=alpha,
            features=features,
            teacher_checkpoint=teacher_checkpoint,
            teacher_class=teacher_class,
            student=student,
            class_dim=class_dim,
            precompute=precompute,
            adapter_lr=adapter_lr,
        )
        self.distiller = Distiller(self.config)
        self._handles: list[Any] = []  # the optimizers' step hooks and the training_step patch

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher module (built in ``setup`` when given as a config or a path)."""
        return self.distiller.teacher

    @property
    def adapters(self) -> nn.ModuleDict:
        """The feature adapters, by the index of their ``features`` entry."""
        return self.distiller.adapters

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._attach(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        self.distiller.to(pl_module.device, dtype)
        step = functools.partial(averaged_step, trainer)  # adapter gradients averaged under DDP
        for optimizer in trainer.optimizers:
            self._handles.append(
                optimizer.register_step_post_hook(lambda *_: self.distiller.step_adapters(step))
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.distiller.start_fit(_dataset_size(trainer))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.distiller.start_epoch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.config.VERSION,
            "temperature": self.config.temperature,
            "alpha": self.config.alpha,
            **self.distiller.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"adapters", "adapter_optimizer"} - set(state_dict)
        if missing:
            raise ValueError(
                f"DistillationCallback state in the checkpoint lacks {sorted(missing)}; it was "
                "not written by this callback"
            )
        version = state_dict.get("version", 1)
        if version > self.config.VERSION:
            raise ValueError(
                f"DistillationCallback state in the checkpoint has version {version}; this "
                f"release reads versions up to {self.config.VERSION}"
            )
        self.distiller.load_state_dict(state_dict)

    # -- what the hooks do -----------------------------------------------------------------------

    def _attach(self, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "DistillationCallback needs automatic optimization: with "
                "`automatic_optimization = False` the module runs backward itself"
            )
        self._detach()
        self.distiller.attach(pl_module)
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            with self.distiller.capture() as forward:
                out = original(*args, **kwargs)
            return self._distilled(pl_module, forward, out)

        self._handles.append(_Patched(pl_module, "training_step", training_step))

    def _detach(self) -> None:
        self.distiller.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _distilled(self, pl_module: pl.LightningModule, forward: Forward, out: Any) -> Any:
        """``training_step``'s output with its loss distilled (None skips the batch)."""
        if out is None:
            return out
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ValueError(
                    "DistillationCallback: training_step returned a mapping without 'loss'"
                )
            return {**out, "loss": self._loss(pl_module, forward, out["loss"])}
        if torch.is_tensor(out):
            return self._loss(pl_module, forward, out)
        raise TypeError(
            "DistillationCallback: training_step must return a loss tensor, a mapping with "
            f"'loss', or None; got {type(out).__name__}"
        )

    def _loss(
        self, pl_module: pl.LightningModule, forward: Forward, loss: torch.Tensor
    ) -> torch.Tensor:
        total, stats = self.distiller.loss(forward, loss)
        # Step values only every `log_every_n_steps` batches: a `log` call costs more than the
        # distillation step itself. Epoch means are logged at the end of the epoch.
        every = max(1, getattr(pl_module.trainer, "log_every_n_steps", 50))
        if self.distiller.steps % every == 0:
            for name, value in stats.items():
                pl_module.log(f"distill/{name}_step", value, on_step=True, on_epoch=False)
        return total

    def _log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, mean in self.distiller.epoch_stats.means().items():
            pl_module.log(f"distill/{name}", mean, on_epoch=True, sync_dist=True)
        rate = self.distiller.memo_hit_rate(trainer.current_epoch)
        if rate is not None:
            pl_module.log("distill/memo_hit_rate", rate, on_epoch=True)
