"""PruneCallback: stateful, resumable, DDP-correct pruning on the trainer's clock."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lightning_compress.callbacks._configured import ConfiguredCallback
from lightning_compress.clock import resolve_steps
from lightning_compress.layout import WeightLayout, layout_for_name
from lightning_compress.pruning.config import PruneConfig
from lightning_compress.pruning.events import PruneListener
from lightning_compress.pruning.flipout import FlipCounter
from lightning_compress.pruning.hard_masks import ZERO_PRESERVING_OPTIMIZERS, HardMasks
from lightning_compress.pruning.plan import PrunePlan, build_plan, check_targets
from lightning_compress.targets import log_targeting, resolve_targets, resolve_weights

log = logging.getLogger(__name__)


class PruneCallback(ConfiguredCallback):
    """Prunes targeted weights to a sparsity that follows a schedule of the optimizer step.

    Pruned weights are zeros in the real parameters (hard masks): their gradients are zeroed
    before each optimizer step, their optimizer state when a mask changes, and the masks are
    re-applied after each step. Masks live in the checkpoint (packed eight to a byte), so a
    resumed run continues with the same masks and schedule.

    Args:
        sparsity: Final fraction of zeros among the targeted weights, in [0, 1). For
            ``structure="N:M"`` it defaults to, and must equal, ``(M - N) / M``; otherwise 0.9.
        schedule: ``"oneshot"`` (all at ``start``), ``"linear"``, ``"cubic"`` (Zhu & Gupta
            2017), ``"iterative"`` (``rate`` of the remaining weights every ``every``) or
            ``"constant"`` (hold the zeros the weights already have).
        start: First pruning step: ``"Nep"`` (epochs), ``"Nit"`` or an int (optimizer steps).
        end: Step at which the final sparsity is reached (linear/cubic).
        every: Steps between pruning events.
        criterion: Name of a registered criterion (``magnitude``, ``random``, your own).
        scope: ``"global"`` (one threshold over all targets) or ``"layer"`` (each target to
            the same sparsity).
        structure: ``"unstructured"``, ``"channel"`` (whole output channels by L2 norm) or
            ``"N:M"`` such as ``"2:4"`` (at most N non-zeros in every M consecutive inputs).
        include: Module or parameter name patterns to target (default: every Linear, Conv and
            attention-projection weight).
        exclude: Patterns removed from the targets.
        rate: Fraction of the remaining weights pruned per event (``schedule="iterative"``).
        overrides: Final sparsity per name pattern, pruned layer-wise, e.g. ``{"fc3": 0.74}``.
        rates: Per-round rate by name pattern for ``schedule="iterative"``, pruned layer-wise
            for the same number of rounds, e.g. ``{"fc3": 0.1}`` (Frankle & Carbin prune the
            output layer at half the rate).
        seed: Seed for random scores and FlipOut noise (identical on every rank and resume).
        flipout_p: Exponent p of the FlipOut score ``|w|^p / (flips + 1)``.
        flipout_noise: FlipOut's gradient-noise scale lambda (0 turns the noise off).
        monitor: Metric recorded at the end of each round of an iterative schedule (the
            accuracy column of the rounds table); skipped when the run does not log it.
        min_density: With ``scope="global"``, the fraction of its weights (of its channels for
            ``structure="channel"``) every pooled layer keeps at least, its highest-scoring
            ones, in [0, 1): one threshold over layers of different fan-in would otherwise empty
            the wider one (layer collapse). The others are pruned further to meet the target;
            if the floors alone exceed it, they are kept and a warning says so. 0 lets the
            threshold take whole layers. Layers pruned alone (``scope="layer"``, ``overrides``,
            ``rates``) keep the sparsity they are given.

    Attributes:
        config: The validated settings (:class:`~lightning_compress.pruning.config.PruneConfig`);
            ``callback.sparsity`` and the other arguments read from it.
        targets: Qualified names of the targeted weights (after ``setup``).
        events: One record per pruning event, in order: ``step``, ``sparsity`` (over all the
            targets) and ``nonzero`` (weights left). Saved in the checkpoint.
        rounds: For ``schedule="iterative"``, one record per round that ended: ``round``,
            ``step``, ``sparsity``, ``remaining`` and the ``monitor`` metric when logged. Saved
            in the checkpoint.

    Raises:
        ValueError: An argument out of range, an unknown name, or two that contradict.
    """

    config: PruneConfig

    def __init__(
        self,
        sparsity: float | None = None,
        schedule: str = "cubic",
        start: str | int = "0ep",
        end: str | int = "10ep",
        every: str | int = "1ep",
        criterion: str = "magnitude",
        scope: str = "global",
        structure: str = "unstructured",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        rate: float | None = None,
        overrides: dict[str, float] | None = None,
        rates: dict[str, float] | None = None,
        seed: int = 0,
        flipout_p: float = 2.0,
        flipout_noise: float = 1.0,
        monitor: str | None = "val/acc",
        min_density: float = 0.001,
    ) -> None:
        self.config = PruneConfig(
            sparsity=sparsity,
            schedule=schedule,
            start=start,
            end=end,
            every=every,
            criterion=criterion,
            scope=scope,
            structure=structure,
            include=include,
            exclude=exclude,
            rate=rate,
            overrides=overrides,
            rates=rates,
            seed=seed,
            flipout_p=flipout_p,
            flipout_noise=flipout_noise,
            monitor=monitor,
            min_density=min_density,
        )
        self.flips: FlipCounter | None = None
        self.rounds: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._listeners: list[PruneListener] = []
        self.targets: list[str] = []
        self.layouts: dict[str, WeightLayout] = {}
        self.plan: PrunePlan | None = None
        self.masks: HardMasks | None = None
        self._last_event = -1
        self._loaded: dict[str, Any] | None = None
        self._hook_handles: list[Any] = []
        self._grads_masked = False
        self._warned: set[tuple[str, str]] = set()  # (layer, reason) warned about once

    # -- PruneEventSource (what RewindCallback uses) ---------------------------------------------

    def add_listener(self, listener: PruneListener) -> None:
        """Registers a callback to be told about this callback's pruning events."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def first_event(self) -> int | None:
        """The optimizer step of the first pruning event; None before the plan or without one."""
        return self.plan.first_event() if self.plan is not None else None

    def reapply_masks(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zeros the pruned weights and their optimizer state again (after a rewind)."""
        if self.masks is not None:
            self.masks.apply_to_weights()
            self.masks.apply_to_optimizer_state(optimizers)

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._resolve_targets(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_step))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._make_plan(trainer)
        self._restore_masks(trainer)
        for listener in self._listeners:
            listener.on_prune_ready(trainer, pl_module, self)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > self._last_event and self.plan is not None and self.plan.is_event(step):
            self._prune(trainer, pl_module, step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.flips is not None:
            # FlipOut masks the gradients and adds its noise in one pass per tensor.
            self.flips.add_noise(trainer.global_step, self.masks.scales if self.masks else None)
            self._grads_masked = True
        elif self.masks:
            self.masks.apply_to_grads()
            self._grads_masked = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule == "iterative" and self.masks is not None:
            self._end_round(trainer, trainer.global_step)
        self._log_table(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        masks = self.masks.state_dict() if self.masks else {"packed": {}, "shapes": {}}
        state: dict[str, Any] = {
            "version": self.config.VERSION,
            "masks": masks,
            "last_event": self._last_event,
            "rounds": [dict(r) for r in self.rounds],
            "events": [dict(e) for e in self.events],
        }
        if self.flips is not None:
            state["flips"] = self.flips.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    # -- work --------------------------------------------------------------------------------------

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Masked gradients and zeroed state already keep zeros exact under the built-in
        # optimizers; anything else (a custom rule, a step that bypassed the hook) is re-masked.
        safe = self._grads_masked and type(optimizer) in ZERO_PRESERVING_OPTIMIZERS
        self._grads_masked = False
        if self.masks and not safe:
            self.masks.apply_to_weights()
        if self.flips is not None:
            self.flips.after_step()

    def resolve(self, pl_module: pl.LightningModule) -> list[str]:
        """The qualified names of the weights this callback targets in ``pl_module``."""
        return resolve_weights(pl_module, self.include, self.exclude, owner="PruneCallback")

    def _resolve_targets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        targeting = resolve_targets(pl_module, self.include, self.exclude, owner="PruneCallback")
        log_targeting("PruneCallback", targeting)
        self.targets = targeting.names
        self.layouts = {name: layout_for_name(pl_module, name) for name in self.targets}
        for other in trainer.callbacks:
            if isinstance(other, PruneCallback) and other is not self:
                shared = sorted(set(self.targets) & set(other.resolve(pl_module)))
                if shared:
                    raise ValueError(
                        f"two PruneCallbacks target the same weights {shared}; give them "
                        "disjoint `include`/`exclude` patterns"
                    )
        params = {name: pl_module.get_parameter(name) for name in self.targets}
        shapes = {n: self.layouts[n].canonical_shape(tuple(p.shape)) for n, p in params.items()}
        check_targets(self.config, shapes)
        self.masks = HardMasks(params)
        if self.criterion == "flipout":
            self.flips = FlipCounter(params, self.flipout_noise, self.seed)

    def _make_plan(self, trainer: pl.Trainer) -> None:
        steps = resolve_steps(trainer, start=self.start, end=self.end, every=self.every)
        self.plan = build_plan(self.config, self.targets, **steps, layouts=self.layouts)  # type: ignore[arg-type]
        last = self.plan.last_event()
        total = trainer.estimated_stepping_batches
        if last is not None and self.schedule != "constant" and last >= total:
            rank_zero_only(log.warning)(
                "PruneCallback: the schedule's last event (step %d) is not before the end of "
                "training (%d steps); the final sparsity %.3f will not be reached",
                last,
                total,
                self.sparsity,
            )

    def _restore_masks(self, trainer: pl.Trainer) -> None:
        assert self.masks is not None
        if self._loaded is not None:
            masks = HardMasks.unpack_state(self._loaded["masks"])
            unknown = sorted(set(masks) - set(self.targets))
            if unknown:
                raise ValueError(
                    f"the checkpoint holds PruneCallback masks for {unknown}, which this "
                    f"callback does not target (targets: {self.targets})"
                )
            self.masks.set(masks)
            self._last_event = int(self._loaded.get("last_event", -1))
            self.rounds = [dict(r) for r in self._loaded.get("rounds", [])]
            self.events = [dict(e) for e in self._loaded.get("events", [])]
            if self.flips is not None and "flips" in self._loaded:
                self.flips.load_state_dict(self._loaded["flips"])
            self._loaded = None
        elif self.schedule == "constant":
            # Hold the zeros the weights already have (e.g. fine-tuning a pruned checkpoint).
            self.masks.set({n: p.detach() != 0 for n, p in self.masks.params.items()})
        self.masks.apply_to_optimizer_state(trainer.optimizers)
        if self.flips is not None:
            self.flips.sync()

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.plan is not None and self.masks is not None
        if self.schedule == "iterative":
            self._end_round(trainer, step)
        for listener in self._listeners:
            listener.before_prune(trainer, pl_module, self, step)
        weights = {n: p.detach() for n, p in self.masks.params.items()}
        current = {n: self.masks.keep_mask(n) for n in self.targets}
        state = None
        if self.flips is not None:
            state = {n: {"flips": f, "p": self.flipout_p} for n, f in self.flips.flips.items()}
        new = self.plan.masks(step, weights, current, state)
        # Rank 0 decides; every rank applies the same masks.
        new = trainer.strategy.broadcast({n: m.cpu() for n, m in new.items()}, src=0)
        self.masks.set(new)
        self.masks.apply_to_optimizer_state(trainer.optimizers)
        if self.flips is not None:
            self.flips.reset(self.masks.keep_masks())
        self._last_event = step
        self._record_event(trainer, step)
        self._warn_overpruned(step)
        for listener in self._listeners:
            listener.after_prune(trainer, pl_module, self, step)
        if self.flips is not None:
            self.flips.sync()  # pruning and rewinding moved weights outside a step

    def _end_round(self, trainer: pl.Trainer, step: int) -> None:
        """Records the round that ends at ``step``: its sparsity and the monitored metric."""
        if self.rounds and self.rounds[-1]["step"] >= step:
            return  # already recorded (a resumed run re-entering the same step)
        kept, total = _totals(self.layer_stats())
        record: dict[str, Any] = {
            "round": len(self.rounds),
            "step": step,
            "sparsity": 1.0 - kept / total,
            "remaining": kept / total,
        }
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if value is not None:
            record[self.monitor] = float(value)
        self.rounds.append(record)
        metrics = {"prune/round": float(record["round"])}
        metrics["prune/round/sparsity"] = record["sparsity"]
        if value is not None:
            metrics[f"prune/round/{self.monitor}"] = record[self.monitor]
        _publish(
            trainer,
            step,
            metrics,
            "PruneCallback: round %d ended at step %d: sparsity %.4f%s",
            record["round"],
            step,
            record["sparsity"],
            f", {self.monitor} {record[self.monitor]:.4f}" if value is not None else "",
        )

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per target, in order: ``layer``, ``shape``, ``numel``, ``nonzero``, ``sparsity``."""
        assert self.masks is not None
        rows = []
        for name in self.targets:
            keep = self.masks.keep_mask(name)
            kept = int(torch.count_nonzero(keep))
            rows.append(
                {
                    "layer": name,
                    "shape": list(keep.shape),
                    "numel": keep.numel(),
                    "nonzero": kept,
                    "sparsity": 1.0 - kept / keep.numel(),
                }
            )
        return rows

    def _record_event(self, trainer: pl.Trainer, step: int) -> None:
        """Appends the event at ``step`` to :attr:`events` and logs it, overall and per layer."""
        rows = self.layer_stats()
        kept, total = _totals(rows)
        event = {"step": step, "sparsity": 1.0 - kept / total, "nonzero": kept}
        self.events.append(event)
        metrics = {"prune/sparsity": event["sparsity"], "prune/nonzero": float(kept)}
        metrics.update({f"prune/sparsity/{r['layer']}": r["sparsity"] for r in rows})
        _publish(
            trainer,
            step,
            metrics,
            "PruneCallback: step %d: sparsity %.4f, %d of %d weights left",
            step,
            event["sparsity"],
            kept,
            total,
        )

    def _warn_overpruned(self, step: int) -> None:
        """Warns, once per layer and reason, of the layers a global threshold left far too sparse.

        The rule is :meth:`~lightning_compress.pruning.plan.PrunePlan.overpruned`'s: a layer held
        at the ``min_density`` floor, or one keeping under 1% of its weights while its group is
        asked to keep more (under a quarter of what it is asked to keep from 99% on); and a group
        all at the floor, short of its target.
        """
        assert self.plan is not None and self.masks is not None
        masks = self.masks.keep_masks()
        for layer in self.plan.overpruned(masks):
            if layer.floored:
                message = (
                    "PruneCallback: %r is held at the `min_density` floor from step %d (sparsity "
                    "%.4f, global target %.4f): the global threshold would prune it further"
                )
            else:
                message = (
                    "PruneCallback: %r is far sparser than asked from step %d (sparsity %.4f, "
                    "global target %.4f): one threshold over layers of different fan-in can "
                    "empty the wider ones; raise `min_density` or use scope='layer'"
                )
            key = (layer.name, "floor" if layer.floored else "far")
            self._warn_once(key, message, layer.name, step, layer.sparsity, layer.target)
        for short in self.plan.shortfalls(step, masks):
            self._warn_once(
                (",".join(short.names), "short"),
                "PruneCallback: the global target sparsity %.4f cannot be met from step %d with "
                "every layer at `min_density`=%g: the floors are kept, sparsity %.4f",
                short.target,
                step,
                self.min_density,
                short.sparsity,
            )

    def _warn_once(self, key: tuple[str, str], message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_only(log.warning)(message, *args)

    def _log_table(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.loggers import WandbLogger

        if not self.masks:
            return
        rows = self.layer_stats()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key="prune/layers",
                    columns=["layer", "shape", "nonzero", "sparsity"],
                    data=[[r["layer"], str(r["shape"]), r["nonzero"], r["sparsity"]] for r in rows],
                )
                measured = [r for r in self.rounds if self.monitor in r]
                if measured:
                    self._log_rounds_plot(logger, measured)

    def _log_rounds_plot(self, logger: Any, rounds: list[dict[str, Any]]) -> None:
        import wandb

        assert self.monitor is not None
        table = wandb.Table(
            columns=["round", "remaining", "sparsity", self.monitor],
            data=[[r["round"], r["remaining"], r["sparsity"], r[self.monitor]] for r in rounds],
        )
        title = f"{self.monitor} against weights remaining"
        logger.experiment.log(
            {
                "prune/rounds": table,
                "prune/rounds_plot": wandb.plot.line(table, "remaining", self.monitor, title=title),
            }
        )


def _totals(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Kept and total weights over :meth:`PruneCallback.layer_stats` rows."""
    return sum(r["nonzero"] for r in rows), sum(r["numel"] for r in rows)


def _publish(
    trainer: pl.Trainer, step: int, metrics: dict[str, float], message: str, *args: Any
) -> None:
    """Sends ``metrics`` to every logger of ``trainer`` at ``step``, ``message`` to the log."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    rank_zero_only(log.info)(message, *args)
