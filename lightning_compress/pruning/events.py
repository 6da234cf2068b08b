"""How callbacks follow pruning events without importing each other's modules.

A pruning callback is a :class:`PruneEventSource`: another callback (``RewindCallback``) finds it
among ``trainer.callbacks`` with ``isinstance`` on this protocol, registers itself as a
:class:`PruneListener`, and is then called at each event by the pruning callback itself, so the
coordination does not depend on the order of ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import pytorch_lightning as pl
    import torch


class PruneListener(Protocol):
    """What a callback implements to be told about a :class:`PruneEventSource`'s events."""

    def on_prune_ready(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prune: PruneEventSource
    ) -> None:
        """The plan is built and masks restored (start of training, before the first step)."""

    def before_prune(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prune: PruneEventSource,
        step: int,
    ) -> None:
        """A pruning event at ``step`` is about to change the masks."""

    def after_prune(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prune: PruneEventSource,
        step: int,
    ) -> None:
        """The masks of the event at ``step`` are set and applied."""


@runtime_checkable
class PruneEventSource(Protocol):
    """A callback that prunes at events and tells its listeners (``PruneCallback``)."""

    def add_listener(self, listener: PruneListener) -> None:
        """Registers ``listener`` to be called at this callback's events."""

    def first_event(self) -> int | None:
        """The optimizer step of the first pruning event; None before the plan or without one."""

    def reapply_masks(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zeros the pruned weights and their optimizer state again (after a rewind)."""


@runtime_checkable
class Rewinder(Protocol):
    """A listener that moves weights or optimizer state back after events (``RewindCallback``).

    Other callbacks that hold state about the weights (``LowRankCallback``) find it with
    ``isinstance`` and refuse what they cannot follow.
    """

    mode: str

    def on_prune_ready(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prune: PruneEventSource
    ) -> None: ...
