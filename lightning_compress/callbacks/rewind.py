"""RewindCallback: lottery tickets, late rewinding, learning-rate rewinding."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lightning_compress.clock import parse_step, resolve_steps
from lightning_compress.pruning.events import PruneEventSource
from lightning_compress.pruning.rewind import (
    check_snapshot,
    reinitialize,
    restore_training_state,
    restore_weights,
    take_snapshot,
)

log = logging.getLogger(__name__)

MODES = ("weights", "lr", "reinit")


class RewindCallback(Callback):
    """Rewinds training to step ``to`` after every pruning event of the run's PruneCallbacks.

    At step ``to`` (``"0ep"``: before the first optimizer step) it snapshots the model's
    weights, the optimizer state and the LR-scheduler state. After each pruning event:

    - ``mode="weights"``: surviving weights go back to the snapshot, and so do the optimizer and
      scheduler (Frankle & Carbin 2019 lottery tickets; ``to`` > 0 is Frankle 2020's late
      rewinding);
    - ``mode="lr"``: the weights stay; optimizer and scheduler go back to the snapshot, so the
      learning-rate schedule is replayed from ``to`` (Renda et al. 2020);
    - ``mode="reinit"``: surviving weights are re-sampled from the layers' initialisation
      (seeded), optimizer and scheduler go back to the snapshot (the lottery-ticket control).

    Masks are never rewound. The PruneCallbacks call this one at their events, so the order of
    ``Trainer(callbacks=[...])`` does not matter. The snapshot is saved in the checkpoint: a
    resumed run rewinds to the original weights at ``to``, not to those it resumed with.

    Args:
        to: The step rewound to: ``"Nep"``, ``"Nit"`` or an int; at or before the first pruning
            event.
        mode: ``"weights"``, ``"lr"`` or ``"reinit"``.
        seed: Seed of ``reinit`` draws (combined with the event's step).

    Raises:
        ValueError: Unknown ``mode`` or a malformed ``to``.
    """

    def __init__(self, to: str | int = "0ep", mode: str = "weights", seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        self.to = parse_step(to, "to")
        self.mode = mode
        self.seed = seed
        self.step: int | None = None
        self.snapshot: dict[str, Any] | None = None
        self.rewinds: list[int] = []
        self._prunes: list[PruneEventSource] = []
        self._ready: set[int] = set()
        self._loaded: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(to=str(self.to), mode=self.mode)

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._prunes = [c for c in trainer.callbacks if isinstance(c, PruneEventSource)]
        if not self._prunes:
            raise ValueError(
                "RewindCallback rewinds after pruning events, but the trainer has no "
                "PruneCallback; add one (e.g. schedule='iterative', rate=0.2)"
            )
        self._ready.clear()
        for prune in self._prunes:
            prune.add_listener(self)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_snapshot(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step if self.step is not None else -1,
            "snapshot": self.snapshot,
            "rewinds": list(self.rewinds),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    # -- called by PruneCallback -------------------------------------------------------------------

    def on_prune_ready(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prune: PruneEventSource
    ) -> None:
        self._ready.add(id(prune))
        if len(self._ready) < len(self._prunes):
            return
        self.step = resolve_steps(trainer, to=self.to)["to"]
        firsts = [f for f in (p.first_event() for p in self._prunes) if f is not None]
        if firsts and self.step > min(firsts):
            raise ValueError(
                f"RewindCallback: `to`={self.to} ({self.step} steps) is after the first pruning "
                f"event (step {min(firsts)}); rewind to a step at or before it"
            )
        if self._loaded is not None:
            snapshot = self._loaded.get("snapshot")
            if snapshot is not None:
                check_snapshot(snapshot, pl_module, trainer.optimizers, self._schedulers(trainer))
            self.snapshot = snapshot
            self.rewinds = [int(s) for s in self._loaded.get("rewinds", [])]
            self._loaded = None
        if self.snapshot is None and trainer.global_step > self.step:
            raise ValueError(
                f"RewindCallback: training starts at step {trainer.global_step}, after `to`="
                f"{self.to} ({self.step} steps), and the checkpoint holds no rewind snapshot; "
                "resume from a checkpoint written with this RewindCallback"
            )

    def before_prune(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prune: PruneEventSource, step: int
    ) -> None:
        # An event at step `to` itself: the snapshot must hold the weights before it.
        self._maybe_snapshot(trainer, pl_module)

    def after_prune(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prune: PruneEventSource, step: int
    ) -> None:
        if self.rewinds and self.rewinds[-1] == step:
            return  # a second PruneCallback's event at the same step: rewound once already
        if self.snapshot is None:
            raise RuntimeError(
                f"RewindCallback: pruning event at step {step} but no snapshot was taken at "
                f"`to`={self.to}"
            )
        schedulers = self._schedulers(trainer)
        if self.mode == "weights":
            restore_weights(pl_module, self.snapshot)
        elif self.mode == "reinit":
            kept = reinitialize(pl_module, self.snapshot, self.seed * 1_000_003 + step)
            if kept and not self.rewinds:
                rank_zero_only(log.warning)(
                    "RewindCallback: %s have no reset_parameters(); mode='reinit' restores "
                    "them from the snapshot instead",
                    kept,
                )
        restore_training_state(self.snapshot, trainer.optimizers, schedulers)
        for other in self._prunes:
            other.reapply_masks(trainer.optimizers)
        self.rewinds.append(step)
        for logger in trainer.loggers:
            logger.log_metrics({"rewind/count": float(len(self.rewinds))}, step=step)
        rank_zero_only(log.info)(
            "RewindCallback: step %d: rewound (%s) to step %d", step, self.mode, self.step
        )

    # -- work --------------------------------------------------------------------------------------

    def _maybe_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.snapshot is None and self.step is not None and trainer.global_step == self.step:
            self.snapshot = take_snapshot(pl_module, trainer.optimizers, self._schedulers(trainer))

    @staticmethod
    def _schedulers(trainer: pl.Trainer) -> list[Any]:
        return [config.scheduler for config in trainer.lr_scheduler_configs]
