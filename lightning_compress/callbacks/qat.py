"""QATCallback: quantization-aware training on the trainer's clock, composing with pruning."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks._configured import ConfiguredCallback
from lightning_compress.callbacks._side_optimizer import averaged_step
from lightning_compress.clock import resolve_steps
from lightning_compress.layout import layout_for_name
from lightning_compress.quantization.config import QATConfig
from lightning_compress.quantization.fake import (
    channel_view,
    lsq_init_step,
    weight_qmax,
    weight_scale,
)
from lightning_compress.quantization.layers import (
    BN_TYPES,
    FakeQuantLayers,
    conv_bn_pairs,
    split_name,
)
from lightning_compress.quantization.record import CompressionRecord
from lightning_compress.targets import log_targeting, match_overrides, resolve_targets

log = logging.getLogger(__name__)


class QATCallback(ConfiguredCallback):
    """Fake-quantizes weights (and activations) while training; converts to integers at the end.

    Weights are quantized per output channel, symmetrically with zero-point 0, so weights a
    PruneCallback zeroed quantize to exactly 0 in either callback order, and scales come from
    the surviving weights. Activations (layer outputs) are quantized per tensor to 8 bits with
    min/max observers that widen at once and narrow by a moving average; the output of the
    last quantized layer (the logits) stays float unless ``quantize_output``. Parameter names and
    the model's ``forward`` are untouched:
    the quantization lives in forward hooks on the model's own layers, installed at setup and
    left on after ``fit``, so the module keeps computing the model that was trained until
    :meth:`remove`. At the end of ``fit`` (or after :meth:`attach`), :attr:`record` holds the
    true integers for export.

    Args:
        bits: Weight bits, 2 to 8.
        start: Step from which quantization is on (``"Nep"``, ``"Nit"`` or an int).
        activations: Activation bits (8) or None/0 for float activations.
        method: ``"ste"``: scales from the weights' range, straight-through estimator;
            ``"lsq"``: learned per-channel step sizes (Esser et al. 2020), initialised at
            2 mean|w| / sqrt(Qp), their gradient scaled by 1 / sqrt(N Qp), trained by the
            callback's own Adam (``lsq_lr``) so the model's optimizer is untouched.
        freeze_observers: Step after which activation ranges stop updating (None: never).
        freeze_bn: Step after which BatchNorm running statistics stop updating (None: never).
        fold_bn: Fold each Conv's following BatchNorm into the quantized weight (Jacob et al.
            2018). None: fold the pairs that exist; True: there must be at least one pair.
        include: Module or parameter name patterns (default: every Linear/Conv/attention weight).
        exclude: Patterns removed from the targets.
        overrides: Weight bits per name pattern, e.g. ``{"fc3": 8}``.
        lsq_lr: Learning rate of the step sizes (``method="lsq"``).
        quantize_output: Also fake-quantize the output of the last quantized layer to run
            (the model's logits, as a rule); off by default.

    Raises:
        ValueError: An argument out of range or an unknown name.
    """

    config: QATConfig

    def __init__(
        self,
        bits: int = 8,
        start: str | int = "0ep",
        activations: int | None = 8,
        method: str = "ste",
        freeze_observers: str | int | None = None,
        freeze_bn: str | int | None = None,
        fold_bn: bool | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        overrides: dict[str, int] | None = None,
        lsq_lr: float = 1e-3,
        quantize_output: bool = False,
    ) -> None:
        self.config = QATConfig(
            bits=bits,
            start=start,
            activations=activations,
            method=method,
            freeze_observers=freeze_observers,
            freeze_bn=freeze_bn,
            fold_bn=fold_bn,
            include=include,
            exclude=exclude,
            overrides=overrides,
            lsq_lr=lsq_lr,
            quantize_output=quantize_output,
        )
        self._step_optimizer: torch.optim.Optimizer | None = None
        self._hook_handles: list[Any] = []
        self.targets: dict[str, int] = {}
        self.layers: FakeQuantLayers | None = None
        # The integers of the last conversion (end of fit, or attach); what `pack` consumes.
        self.record: CompressionRecord | None = None
        self._steps: dict[str, int | None] = {}
        self._loaded: dict[str, Any] | None = None
        self._bns: list[nn.Module] = []

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._install(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method == "lsq":
            for optimizer in trainer.optimizers:
                self._hook_handles.append(
                    optimizer.register_step_post_hook(lambda *_: self._step_sizes(trainer))
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps = resolve_steps(
            trainer,
            start=self.start,
            freeze_observers=self.freeze_observers,
            freeze_bn=self.freeze_bn,
        )
        for arg in ("freeze_observers", "freeze_bn"):
            step = self._steps[arg]
            if step is not None and step < self._steps["start"]:
                raise ValueError(
                    f"`{arg}`={getattr(self.config, arg)} ({step} steps) is before "
                    f"`start`={self.start} ({self._steps['start']} steps)"
                )
        self._restore()
        self._phase(trainer.global_step, training=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase(trainer.global_step, training=True)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._sync_observers(trainer)
        if self.layers is not None:
            self.layers.end_batch()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_phase()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        self._eval_phase()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        self._eval_phase()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_stats(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers is not None and self.layers.enabled:
            self.record = self.convert()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The quantization stays on the module: after fit it computes the model that was
        # trained until the user calls `remove`. Only the observers stop moving.
        self._eval_phase()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        layers = self.layers
        state: dict[str, Any] = {
            "version": self.config.VERSION,
            "enabled": bool(layers.enabled) if layers else False,
            "observers": {n: o.state_dict() for n, o in layers.observers.items()} if layers else {},
            "output_layer": layers.output_layer if layers else None,
        }
        if layers is not None and layers.steps:
            state["steps"] = {n: s.detach().cpu().clone() for n, s in layers.steps.items()}
            assert self._step_optimizer is not None
            state["step_optimizer"] = self._step_optimizer.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    # -- work --------------------------------------------------------------------------------------

    def _install(self, pl_module: pl.LightningModule) -> None:
        if self.layers is not None and self.layers.model is pl_module:
            # Testing or predicting after fit: the same quantizer (observers, steps, enabled),
            # so evaluation sees the fake-quantized model that was trained, not fresh observers.
            self.layers.install()
            return
        targeting = resolve_targets(pl_module, self.include, self.exclude, owner="QATCallback")
        log_targeting("QATCallback", targeting)
        names = targeting.names
        per_layer = match_overrides(names, self.overrides, "overrides", "QATCallback")
        self.targets = {n: int(per_layer.get(n, self.bits)) for n in names}
        pairs = conv_bn_pairs(pl_module)
        if self.fold_bn and not pairs:
            raise ValueError(
                "QATCallback: `fold_bn`=True but the model has no Conv followed by a BatchNorm "
                "with matching channels; set fold_bn=None (fold where possible) or False"
            )
        folds = {}
        if self.fold_bn is not False:
            folds = {c: b for c, b in pairs.items() if f"{c}.weight" in self.targets}
        self._bns = [m for m in pl_module.modules() if isinstance(m, BN_TYPES)]
        if self.layers is not None:
            self.layers.remove()
        self.layers = FakeQuantLayers(
            pl_module,
            self.targets,
            folds,
            self.activations,
            layouts={n: layout_for_name(pl_module, n) for n in self.targets},
            quantize_output=self.quantize_output,
        )
        self.layers.install()

    def remove(self, pl_module: nn.Module | None = None) -> None:
        """Takes the quantization off the model: it computes with its float weights again.

        After ``fit`` the module keeps computing the fake-quantized model that was trained
        (hooks on its own layers; names, forward and state dict unchanged), so evaluating or
        serving it right away gives the accuracy that was measured. Call this to get the float
        network back; the integers (:attr:`record`) are kept for :func:`~lightning_compress.
        export.pack`. A later ``fit``/``validate``/``test`` with this callback puts it back on.

        Args:
            pl_module: The module to take it off (default: the one it is on).

        Raises:
            ValueError: ``pl_module`` is not the module this callback quantizes.
        """
        if self.layers is None:
            return
        if pl_module is not None and pl_module is not self.layers.model:
            raise ValueError(
                "QATCallback.remove: this callback quantizes another module "
                f"({type(self.layers.model).__name__} at {id(self.layers.model):#x})"
            )
        self.layers.remove()

    def _restore(self) -> None:
        if self._loaded is None or self.layers is None:
            return
        state, self._loaded = self._loaded, None
        unknown = sorted(set(state.get("observers", {})) - set(self.layers.observers))
        if unknown:
            raise ValueError(
                f"the checkpoint holds QATCallback observers for {unknown}, which this callback "
                f"does not quantize (layers: {sorted(self.layers.observers)})"
            )
        for name, observer_state in state.get("observers", {}).items():
            self.layers.observers[name].load_state_dict(observer_state)
        self.layers.enabled = bool(state.get("enabled", False))
        self.layers.output_layer = state.get("output_layer")
        if "steps" in state:
            params = dict(self.layers.model.named_parameters())
            self._init_steps(
                {n: s.to(params[n].device) for n, s in state["steps"].items() if n in params}
            )
            assert self._step_optimizer is not None
            self._step_optimizer.load_state_dict(state["step_optimizer"])

    def _phase(self, step: int, training: bool) -> None:
        assert self.layers is not None
        self.layers.enabled = step >= self._steps["start"]
        if self.layers.enabled and self.method == "lsq" and not self.layers.steps:
            with torch.no_grad():
                self._init_steps(
                    {
                        name: lsq_init_step(self.layers.folded_weight(*split_name(name))[0], bits)
                        for name, bits in self.targets.items()
                    }
                )
        frozen = self._steps.get("freeze_observers")
        self.layers.observing = self.layers.enabled and (frozen is None or step < frozen)
        freeze_bn = self._steps.get("freeze_bn")
        if training and freeze_bn is not None and step >= freeze_bn:
            for bn in self._bns:
                bn.eval()  # Lightning sets train() each epoch; statistics stay frozen

    def _init_steps(self, steps: dict[str, torch.Tensor]) -> None:
        assert self.layers is not None
        self.layers.steps = {n: s.detach().clone().requires_grad_(True) for n, s in steps.items()}
        self._step_optimizer = torch.optim.Adam(list(self.layers.steps.values()), lr=self.lsq_lr)

    def _step_sizes(self, trainer: pl.Trainer) -> None:
        """One Adam step on the learned step sizes, after each step of the model's optimizer."""
        if self.layers is None or not self.layers.steps or self._step_optimizer is None:
            return
        steps = list(self.layers.steps.values())
        averaged_step(trainer, self._step_optimizer, steps)
        with torch.no_grad():
            for step in steps:
                step.clamp_(min=1e-8)

    def _eval_phase(self) -> None:
        if self.layers is not None:
            self.layers.observing = False

    def _sync_observers(self, trainer: pl.Trainer) -> None:
        """Every rank folds the same (all-reduced) batch range into its observers."""
        layers = self.layers
        if layers is None or not layers.batch_ranges:
            return
        names = sorted(layers.batch_ranges)
        ranges = torch.stack([layers.batch_ranges[n] for n in names])
        ranges = (
            trainer.strategy.reduce(ranges, reduce_op="max") if trainer.world_size > 1 else ranges
        )
        ranges = ranges.cpu()
        for name, (neg_lo, hi) in zip(names, ranges.tolist(), strict=True):
            layers.observers[name].observe(-neg_lo, hi)
        layers.batch_ranges.clear()

    def attach(self, pl_module: nn.Module, state: dict[str, Any] | None = None) -> QATCallback:
        """Rebuilds the integer weights of a trained model outside a Trainer (for export).

        Args:
            pl_module: The model as trained (weights restored from its checkpoint).
            state: This callback's entry in the checkpoint's ``callbacks`` (observers, learned
                steps); without it, activation ranges are unknown and steps are the default.

        Returns:
            ``self``, with :attr:`record` filled and no hooks left on the model.
        """
        self._install(pl_module)
        assert self.layers is not None
        try:
            if state is not None:
                self.load_state_dict(state)
                self._restore()
            self.layers.enabled = True
            self.record = self.convert()
        finally:
            self.layers.remove()
        return self

    def convert(self) -> CompressionRecord:
        """True integer weights of the quantized layers, as the fake-quantized model uses them.

        Returns:
            One :class:`~lightning_compress.quantization.QuantizedLayer` per weight, named as in
            the trained module: int8 values, float32 scales per output channel (a folded
            BatchNorm's factor already divided out), bits and the output's activation range.
        """
        assert self.layers is not None
        return self.layers.convert()

    def _log_stats(self, trainer: pl.Trainer) -> None:
        if self.layers is None or not self.layers.enabled:
            return
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for name, bits in self.targets.items():
                weight, _ = self.layers.folded_weight(*split_name(name))
                step = self.layers.steps.get(name)
                scale = weight_scale(weight, bits) if step is None else step.detach()
                limit = weight_qmax(bits) * channel_view(scale, weight)
                metrics[f"qat/bits/{name}"] = float(bits)
                metrics[f"qat/scale_mean/{name}"] = float(scale.mean())
                # Weights beyond the largest integer (LSQ steps can clip; range scales cannot).
                metrics[f"qat/clipped/{name}"] = float(
                    (weight.abs() > limit * 1.000001).float().mean()
                )
        for name, observer in self.layers.observers.items():
            if observer.initialized:
                lo, hi = float(observer.min), float(observer.max)
                metrics[f"qat/act_range/{name or 'model'}"] = hi - lo
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_only(log.info)(
            "QATCallback: epoch %d: %d layers at %s bits",
            trainer.current_epoch,
            len(self.targets),
            sorted(set(self.targets.values())),
        )
