"""QATCallback: quantization-aware training on the trainer's clock, composing with pruning."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
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
from lightning_compress.quantization.kmeans import SharedWeight, check_groups
from lightning_compress.quantization.layers import (
    BN_TYPES,
    FakeQuantLayers,
    conv_bn_pairs,
    split_name,
)
from lightning_compress.quantization.record import CompressionRecord
from lightning_compress.targets import log_targeting, match_overrides, resolve_targets

log = logging.getLogger(__name__)

# A refresh that moves more than this share of a layer's weights is scattering its clusters.
SCATTER_WARNING = 0.1


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

    With ``scheme="kmeans"`` the weights are shared instead (Deep Compression, Han et al.
    2016): at ``start`` each targeted layer's non-zero weights are clustered into ``2**bits``
    centroids (1-D k-means, linear initialisation), per layer or per group of output channels;
    the forward then computes with each weight's centroid (exact zeros stay zeros, a weight
    pruned later leaves the codebook at once), the centroids train on the summed gradients of
    their weights with the callback's own Adam (``kmeans_lr``), the dense weight keeps training
    straight through, and every ``refresh`` each weight is re-assigned to its nearest centroid.
    :attr:`record` then holds :class:`~lightning_compress.quantization.SharedLayer` records.
    BatchNorm is not folded into shared layers.

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
        scheme: ``"uniform"`` (integer grid, the default) or ``"kmeans"`` (weight sharing;
            ``bits`` are then index bits, 1 to 8).
        groups: Codebooks per layer for ``"kmeans"`` (consecutive output channels share one);
            must divide every targeted layer's output channels.
        refresh: ``"kmeans"``: re-assign every weight to its nearest centroid at this period
            of the step clock (``"Nep"``, ``"Nit"`` or an int); None: never. Keep it short
            (``"10it"``): between refreshes the dense weights drift open-loop, and an epoch of
            drift at a high learning rate scatters the clusters (a warning says so when a
            refresh moves more than 10% of a layer).
        kmeans_lr: Learning rate of the centroids (``"kmeans"``).

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
        scheme: str = "uniform",
        groups: int = 1,
        refresh: str | int | None = None,
        kmeans_lr: float = 1e-4,
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
            scheme=scheme,
            groups=groups,
            refresh=refresh,
            kmeans_lr=kmeans_lr,
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
        self._codebook_optimizer: torch.optim.Optimizer | None = None
        # The step of the last clustering or refresh (a refresh is due once per step).
        self._last_refresh: int | None = None
        self._warned_scatter = False
        # Per shared layer: the fraction of its weights that changed cluster at the last refresh.
        self.reassigned: dict[str, float] = {}

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._install(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method == "lsq" or self.scheme == "kmeans":
            for optimizer in trainer.optimizers:
                self._hook_handles.append(
                    optimizer.register_step_post_hook(lambda *_: self._side_steps(trainer))
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps = resolve_steps(
            trainer,
            start=self.start,
            freeze_observers=self.freeze_observers,
            freeze_bn=self.freeze_bn,
            refresh=self.refresh,
        )
        if self._steps["refresh"] == 0:
            raise ValueError(
                f"`refresh`={self.refresh} is 0 optimizer steps with this trainer; give a "
                "period of at least one step"
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
        self._share(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase(trainer.global_step, training=True)
        self._share(trainer)

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
        self._log_histograms(trainer)

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
        if layers is not None and layers.shared:
            state["shared"] = {n: s.state_dict() for n, s in layers.shared.items()}
            assert self._codebook_optimizer is not None
            state["codebook_optimizer"] = self._codebook_optimizer.state_dict()
            state["last_refresh"] = self._last_refresh
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
        if self.scheme == "kmeans":
            self._check_sharable(pl_module)
        elif self.fold_bn is not False:
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

    def _check_sharable(self, pl_module: nn.Module) -> None:
        """Fails fast where no codebook can fit: groups that do not divide a layer's output
        channels, or a group with fewer weights than centroids even before pruning."""
        for name, bits in self.targets.items():
            shape = layout_for_name(pl_module, name).canonical(pl_module.get_parameter(name)).shape
            check_groups(name, shape, self.groups)
            per_group = shape.numel() // self.groups
            if per_group < 2**bits:
                raise ValueError(
                    f"QATCallback: {name} has {per_group} weights per codebook (`groups`="
                    f"{self.groups}), fewer than the {2**bits} centroids of `bits`={bits}"
                )

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
        if "shared" in state:
            unknown = sorted(set(state["shared"]) - set(self.targets))
            if unknown:
                raise ValueError(
                    f"the checkpoint holds QATCallback codebooks for {unknown}, which this "
                    f"callback does not share (layers: {sorted(self.targets)})"
                )
            shared = {}
            for name, layer_state in state["shared"].items():
                weight = self.layers.folded_weight(*split_name(name))[0]
                shared[name] = SharedWeight.from_state(layer_state, weight.shape, weight.device)
            self._init_codebooks(shared)
            assert self._codebook_optimizer is not None
            self._codebook_optimizer.load_state_dict(state["codebook_optimizer"])
            self._last_refresh = state.get("last_refresh")

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

    def _side_steps(self, trainer: pl.Trainer) -> None:
        """After each step of the model's optimizer: the callback's own parameters' steps."""
        self._step_sizes(trainer)
        self._step_codebooks(trainer)

    def _share(self, trainer: pl.Trainer) -> None:
        """Clusters at ``start`` and re-assigns every ``refresh`` steps (``scheme="kmeans"``)."""
        layers = self.layers
        if self.scheme != "kmeans" or layers is None or not layers.enabled:
            return
        step = trainer.global_step
        if not layers.shared:
            self._init_codebooks(self._broadcast(trainer, self._cluster()))
            self._snap()
            self._last_refresh = step
            rank_zero_only(log.info)(
                "QATCallback: step %d: %d layers clustered into %s centroids (%d per layer)",
                step,
                len(self.targets),
                sorted({2**b for b in self.targets.values()}),
                self.groups,
            )
            return
        every = self._steps.get("refresh")
        if every is None or step == self._last_refresh or (step - self._steps["start"]) % every:
            return
        with torch.no_grad():
            self.reassigned = {
                name: shared.refresh(layers.folded_weight(*split_name(name))[0])
                for name, shared in layers.shared.items()
            }
        self._broadcast(trainer, layers.shared)
        self._last_refresh = step
        scattered = {n: f for n, f in self.reassigned.items() if f > SCATTER_WARNING}
        if scattered and not self._warned_scatter:
            self._warned_scatter = True
            rank_zero_warn(
                f"QATCallback: the refresh at step {step} moved "
                + ", ".join(f"{100 * f:.0f}% of {n}" for n, f in scattered.items())
                + " to another centroid: between refreshes the dense weights drift by their "
                "summed gradients with nothing in the forward to hold them, and a long "
                f"`refresh`={self.refresh} at this learning rate scatters the clusters (the "
                "accuracy falls); refresh every few steps (e.g. '10it'), or not at all"
            )
        metrics = {f"qat/reassigned/{n}": f for n, f in self.reassigned.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()
    def _snap(self) -> None:
        """Sets every shared weight to its centroid at clustering (zeros stay zero): the dense
        weight trains straight through from there, and a refresh moves it to another cluster by
        what it learnt since. Not at refreshes: a weight set back to its centroid every few
        steps could never cross to another."""
        assert self.layers is not None
        for name, shared in self.layers.shared.items():
            weight = self.layers.folded_weight(*split_name(name))[0]
            weight.copy_(shared(weight))

    def _cluster(self) -> dict[str, SharedWeight]:
        assert self.layers is not None
        return {
            name: SharedWeight.cluster(
                self.layers.folded_weight(*split_name(name))[0], bits, self.groups, name
            )
            for name, bits in self.targets.items()
        }

    @staticmethod
    def _broadcast(trainer: pl.Trainer, shared: dict[str, SharedWeight]) -> dict[str, SharedWeight]:
        """Every rank takes rank 0's codebooks and assignments (in place)."""
        if trainer.world_size <= 1:
            return shared
        payload = {n: (s.codebook.detach().cpu(), s.indices.cpu()) for n, s in shared.items()}
        payload = trainer.strategy.broadcast(payload, src=0)
        with torch.no_grad():
            for name, (codebook, indices) in payload.items():
                shared[name].codebook.copy_(codebook)
                shared[name].indices.copy_(indices)
        return shared

    def _init_codebooks(self, shared: dict[str, SharedWeight]) -> None:
        assert self.layers is not None
        self.layers.shared = shared
        self._codebook_optimizer = torch.optim.Adam(
            [s.codebook for s in shared.values()], lr=self.kmeans_lr
        )

    def _step_codebooks(self, trainer: pl.Trainer) -> None:
        """One Adam step on the centroids (their gradients: Deep Compression's sums)."""
        if self.layers is None or not self.layers.shared or self._codebook_optimizer is None:
            return
        averaged_step(
            trainer, self._codebook_optimizer, [s.codebook for s in self.layers.shared.values()]
        )

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
            if self.scheme == "kmeans" and not self.layers.shared:
                self._init_codebooks(self._cluster())  # no state: cluster the weights as they are
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
                metrics[f"qat/bits/{name}"] = float(bits)
                shared = self.layers.shared.get(name)
                if shared is not None:
                    metrics.update(_centroid_metrics(name, shared.codebook.detach()))
                    continue
                weight, _ = self.layers.folded_weight(*split_name(name))
                step = self.layers.steps.get(name)
                scale = weight_scale(weight, bits) if step is None else step.detach()
                limit = weight_qmax(bits) * channel_view(scale, weight)
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

    def _log_histograms(self, trainer: pl.Trainer) -> None:
        """Under W&B: each shared layer's non-zero weights as a histogram, centroids marked."""
        from pytorch_lightning.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or self.layers is None or not self.layers.shared:
            return
        images = {}
        for name, shared in self.layers.shared.items():
            weight = self.layers.folded_weight(*split_name(name))[0].detach()
            images[f"qat/centroids/{name}"] = _histogram_image(
                weight[weight != 0],
                shared.codebook.detach(),
                f"{name} at step {trainer.global_step}",
            )
        for logger in loggers:
            logger.experiment.log(images, step=trainer.global_step)


# Up to this many centroids are logged one by one; larger codebooks by their range alone.
LOGGED_CENTROIDS = 16


def _centroid_metrics(name: str, codebook: torch.Tensor) -> dict[str, float]:
    metrics = {
        f"qat/centroid_min/{name}": float(codebook.min()),
        f"qat/centroid_max/{name}": float(codebook.max()),
    }
    if codebook.numel() <= LOGGED_CENTROIDS:
        ordered = codebook.reshape(-1).sort().values.tolist()
        metrics.update({f"qat/centroid/{name}/{i}": v for i, v in enumerate(ordered)})
    return metrics


def _histogram_image(values: torch.Tensor, codebook: torch.Tensor, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    figure, axes = plt.subplots(figsize=(6, 3))
    axes.hist(values.float().cpu().numpy(), bins=100, color="0.6")
    for centroid in codebook.reshape(-1).unique().tolist()[: LOGGED_CENTROIDS * 16]:
        axes.axvline(centroid, color="tab:red", linewidth=0.8)
    axes.set_title(title)
    axes.set_xlabel("weight (red: centroids)")
    image = wandb.Image(figure)
    plt.close(figure)
    return image
