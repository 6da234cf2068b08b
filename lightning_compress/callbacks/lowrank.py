"""LowRankCallback: a hard rank constraint on the real weights, on the trainer's clock."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lightning_compress.callbacks._configured import ConfiguredCallback
from lightning_compress.clock import resolve_steps
from lightning_compress.layout import WeightLayout, layout_of
from lightning_compress.lowrank.config import LowRankConfig
from lightning_compress.lowrank.factored import FactoredLayer, factoring_refusal
from lightning_compress.lowrank.factors import (
    full_rank,
    kept_energy,
    lowrank_record,
    orthonormal,
    randomized_truncate,
    retract,
    svd,
    truncate,
)
from lightning_compress.lowrank.plan import (
    RankPlan,
    build_rank_plan,
    factored_params,
    target_ranks,
)
from lightning_compress.pruning.events import PruneEventSource, Rewinder
from lightning_compress.quantization.record import CompressionRecord, RecordSource
from lightning_compress.targets import log_targeting, resolve_targets

log = logging.getLogger(__name__)

_OWNER = "LowRankCallback"
# How far a restored weight may sit from the rank the checkpoint says it has (relative norm);
# float32 retractions leave ~1e-6, a weight from another run or model is off by O(1).
_RANK_TOLERANCE = 1e-3
# Weights from this many entries up take a randomized SVD at events where their target is fixed.
_LARGE = 1 << 20


class LowRankCallback(ConfiguredCallback):
    """Keeps targeted weights at a rank that falls along a schedule of the optimizer step.

    From the first event on, every targeted weight has rank <= its current target after every
    optimizer step, under its own name and shape, so a checkpoint loads into the plain model
    with ``strict=True``. At each event an SVD truncates each weight to its new rank (the best
    approximation, Eckart-Young); between events:

    - ``method="projected"`` (default): the optimizer trains the real weight, and after each
      step one step of subspace iteration from the last right basis retracts it to its rank
      (:func:`~lightning_compress.lowrank.factors.retract`, 3 m n r flops). Works for every
      registered weight (Linear, Conv, attention in-projections, Conv1D) and under DDP; a
      ``QATCallback`` on the same weight fake-quantizes the rank-r product.
    - ``method="factored"``: the optimizer trains the two factors in the weight's place, the
      layer computes through them (r (m + n) multiply-adds per input, cheaper than the dense
      layer), and the weight is written back as their product after each step. nn.Linear,
      transformers' Conv1D and nn.Conv2d (groups=1), one process.

    The rank in force, the right bases (projected) or the factors (factored) live in the
    checkpoint: a resumed run continues with the same ranks and the same retraction.

    Args:
        rank: The final rank: an int (the same for every target), or a float in (0, 1], a
            fraction of each layer's full rank (floored, at least 1).
        energy: Instead of ``rank``: each layer keeps the smallest rank whose singular values
            hold this share of its squared Frobenius norm, chosen at every event.
        params: Instead of ``rank``: the share of each layer's parameters it keeps, in (0, 1]:
            the largest rank r with r (m + n) <= params * m n (``1/6`` is a sixth of each).
        schedule: ``"oneshot"`` (the final rank at ``start``), ``"linear"`` or ``"cubic"``
            (the share of the rank removed rises as sparsity does in pruning).
        start: First event: ``"Nep"`` (epochs), ``"Nit"`` or an int (optimizer steps).
        end: Step at which the final rank is reached (linear/cubic).
        every: Steps between events.
        include: Module or parameter name patterns to target (default: every Linear, Conv and
            attention-projection weight).
        exclude: Patterns removed from the targets.
        overrides: Final rank (int or fraction) per name pattern, e.g. ``{"fc3": 10}``.
        method: ``"projected"`` or ``"factored"`` (see above).

    Attributes:
        config: The validated settings (:class:`~lightning_compress.lowrank.LowRankConfig`).
        targets: Qualified names of the targeted weights (after ``setup``).
        ranks: The rank in force per target (its full rank before its first event).
        events: One record per event: ``step``, ``params`` (of the targets at their ranks) and
            ``dense`` (their dense count), ``layers`` (per target: ``rank``, ``energy``).

    Raises:
        ValueError: An argument out of range, an unknown name, or two that contradict.
    """

    config: LowRankConfig

    def __init__(
        self,
        rank: int | float | None = None,
        energy: float | None = None,
        params: float | None = None,
        schedule: str = "cubic",
        start: str | int = "0ep",
        end: str | int = "10ep",
        every: str | int = "1ep",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        overrides: dict[str, int | float] | None = None,
        method: str = "projected",
    ) -> None:
        self.config = LowRankConfig(
            rank=rank,
            energy=energy,
            params=params,
            schedule=schedule,
            start=start,
            end=end,
            every=every,
            include=include,
            exclude=exclude,
            overrides=overrides,
            method=method,
        )
        self.targets: list[str] = []
        self.layouts: dict[str, WeightLayout] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.ranks: dict[str, int] = {}
        self.bases: dict[str, torch.Tensor] = {}
        self.factored: dict[str, FactoredLayer] = {}
        self.events: list[dict[str, Any]] = []
        self.spectra: dict[str, torch.Tensor] = {}  # of the last event, for plots
        self.plan: RankPlan | None = None
        self._model: torch.nn.Module | None = None
        self._last_event = -1
        self._loaded: dict[str, Any] | None = None
        self._hook_handles: list[Any] = []
        self._owned: dict[int, set[int]] = {}  # optimizer id -> ids of the parameters it trains

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._resolve_targets(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_others(trainer)
        # Before Lightning restores the optimizer's state: the factors must already hold their
        # slots, so a resumed optimizer state lands on them.
        self._restore(trainer)
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_step))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = resolve_steps(trainer, start=self.start, end=self.end, every=self.every)
        self.plan = build_rank_plan(self.config, self.shapes, **steps)  # type: ignore[arg-type]
        last = self.plan.last_event()
        if last is not None and last >= trainer.estimated_stepping_batches:
            rank_zero_only(log.warning)(
                "LowRankCallback: the schedule's last event (step %d) is not before the end of "
                "training (%d steps); the final ranks will not be reached",
                last,
                trainer.estimated_stepping_batches,
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > self._last_event and self.plan is not None and self.plan.is_event(step):
            self._event(trainer, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_table(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._owned.clear()
        for layer in self.factored.values():
            # After fit the module is the plain layer again, computing the rank-r weight.
            layer.write_back()
            layer.remove()
            layer.weight.requires_grad_(True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.config.VERSION,
            "method": self.method,
            "ranks": dict(self.ranks),
            "last_event": self._last_event,
            "events": [dict(e) for e in self.events],
            "bases": {n: b.detach().cpu().clone() for n, b in self.bases.items()},
            "factors": {
                n: {
                    "first": f.first.detach().cpu().clone(),
                    "second": f.second.detach().cpu().clone(),
                }
                for n, f in self.factored.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    # -- what export reads -----------------------------------------------------------------------

    @property
    def record(self) -> CompressionRecord | None:
        """The targets below their full rank, as two factors each (None before any event)."""
        return self.to_record()

    def to_record(self, bits: int | None = None) -> CompressionRecord | None:
        """The export record of the constrained targets, factors fp32 or quantized at ``bits``.

        Args:
            bits: Quantize each factor per channel to 8 or 4 bits when packed, or None (fp32;
                a ``QATCallback`` record of the same layer then decides, see ``pack``).
        """
        ranks = self.constrained()
        if self._model is None or not ranks:
            return None
        return lowrank_record(self._model, ranks, bits)

    def constrained(self) -> dict[str, int]:
        """The targets held below their full rank, with their ranks."""
        return {n: r for n, r in self.ranks.items() if r < full_rank(self.shapes[n])}

    # -- work --------------------------------------------------------------------------------------

    def _resolve_targets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        targeting = resolve_targets(pl_module, self.include, self.exclude, owner=_OWNER)
        log_targeting(_OWNER, targeting)
        if self.method == "factored" and trainer.world_size > 1:
            raise ValueError(
                f"{_OWNER}: method='factored' trains the factors outside DDP's gradient "
                f"synchronisation and runs in one process only (world size "
                f"{trainer.world_size}); use method='projected' under DDP"
            )
        layouts, shapes = {}, {}
        for name in targeting.names:
            owner, _, leaf = name.rpartition(".")
            module = pl_module.get_submodule(owner) if owner else pl_module
            layout = layout_of(module, leaf)
            if layout is None:
                raise ValueError(
                    f"{_OWNER}: {name!r} belongs to a {type(module).__name__}, which cannot be "
                    "factored (not a registered layer type: Linear, Conv, attention projections, "
                    "Conv1D; `lightning_compress.layout.register_layout` adds one)"
                )
            if self.method == "factored":
                why = factoring_refusal(module, leaf)
                if why is not None:
                    raise ValueError(
                        f"{_OWNER}: method='factored' cannot train {name!r}: {why}; use "
                        "method='projected' or exclude it"
                    )
            layouts[name] = layout
            param = pl_module.get_parameter(name)
            shapes[name] = layout.canonical_shape(tuple(param.shape))
        target_ranks(self.config, shapes)  # raises for bad overrides and ranks above full
        self.targets, self.layouts, self.shapes = list(targeting.names), layouts, shapes
        if not self.ranks:
            self.ranks = {n: full_rank(s) for n, s in shapes.items()}
        self._model = pl_module

    def _check_others(self, trainer: pl.Trainer) -> None:
        mine = set(self.targets)
        for other in trainer.callbacks:
            if other is self:
                continue
            if isinstance(other, Rewinder) and (self.method == "factored" or other.mode != "lr"):
                raise ValueError(
                    f"{_OWNER} (method={self.method!r}) cannot follow a RewindCallback with "
                    f"mode={other.mode!r}: it would move the low-rank weights"
                    + (" or their optimizer state" if self.method == "factored" else "")
                    + " back outside an optimizer step; use mode='lr' with method='projected'"
                )
            theirs = set(getattr(other, "targets", None) or ())
            shared = sorted(mine & theirs)
            if not shared:
                continue
            if isinstance(other, PruneEventSource | LowRankCallback):
                raise ValueError(
                    f"{_OWNER} and {type(other).__name__} both target {shared}: a weight is "
                    "either pruned or factored; give them disjoint `include`/`exclude` patterns"
                )
            if self.method == "factored" and isinstance(other, RecordSource):
                raise ValueError(
                    f"{_OWNER}: method='factored' computes {shared} from their factors, so "
                    f"{type(other).__name__} would quantize a weight the forward never reads; "
                    "use method='projected' (QAT then quantizes the rank-r product)"
                )

    def _matrix(self, name: str) -> torch.Tensor:
        assert self._model is not None
        return self.layouts[name].matrix(self._model.get_parameter(name).data)

    def _write(self, name: str, matrix: torch.Tensor) -> None:
        assert self._model is not None
        param = self._model.get_parameter(name)
        if matrix.data_ptr() != param.data.data_ptr():  # a copy (a non-standard layout)
            param.data.copy_(self.layouts[name].from_matrix(matrix, param.shape))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Only the layers this optimizer trains (recomputed after factors move into it).
        owned = self._owned.get(id(optimizer))
        if owned is None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._owned[id(optimizer)] = owned
        assert self._model is not None
        for name, basis in self.bases.items():
            if id(self._model.get_parameter(name)) in owned:
                matrix = self._matrix(name)
                self.bases[name] = retract(matrix, basis)
                self._write(name, matrix)
        for layer in self.factored.values():
            if id(layer.first) in owned:
                layer.write_back()

    def _event(self, trainer: pl.Trainer, step: int) -> None:
        assert self.plan is not None
        decisions: dict[str, dict[str, Any]] = {}
        if trainer.is_global_zero:
            for name in self.targets:
                decisions[name] = self._decide(name, step)
        # Rank 0 decides; every rank applies the same factors.
        decisions = trainer.strategy.broadcast(decisions, src=0)
        for name, d in decisions.items():
            self._apply(trainer, name, d)
        self._last_event = step
        self._record_event(trainer, step, decisions)

    def _decide(self, name: str, step: int) -> dict[str, Any]:
        """The rank of ``name`` at ``step`` and its truncation (on rank zero)."""
        assert self.plan is not None
        matrix = self._matrix(name)
        layer = self.plan.layers[name]
        planned = None if layer.target is None else self.plan.rank_at(name, step)
        if planned is not None and planned * 4 <= layer.full and matrix.numel() >= _LARGE:
            # A fixed target far below full rank: a randomized SVD finds it at a fraction of
            # the cost of a full one (a minute for a 4096 x 4096 weight on two cores).
            rank = min(self.ranks[name], planned)
            cut = randomized_truncate(matrix, rank, seed=step)
        else:
            factors = svd(matrix)
            planned = self.plan.rank_at(name, step, factors[1])
            rank = min(self.ranks[name], planned)  # a rank never grows back
            cut = truncate(matrix, rank, factors)
        total = float(matrix.double().square().sum())
        return {
            "rank": rank,
            "first": cut.first.cpu(),
            "second": cut.second.cpu(),
            "basis": cut.basis.cpu(),
            "singular": cut.singular.cpu(),
            "energy": kept_energy(cut.singular, rank, total),
        }

    def _apply(self, trainer: pl.Trainer, name: str, d: dict[str, Any]) -> None:
        rank = int(d["rank"])
        self.ranks[name] = rank
        self.spectra[name] = d["singular"]
        if rank >= full_rank(self.shapes[name]):
            return  # nothing to hold yet
        param = self._model.get_parameter(name)  # type: ignore[union-attr]
        first, second = d["first"].to(param), d["second"].to(param)
        if self.method == "projected":
            self.bases[name] = d["basis"].to(param)
            matrix = self._matrix(name)
            matrix.copy_(first @ second)
            self._write(name, matrix)
            return
        layer = self.factored.get(name)
        if layer is None:
            self._factor(trainer, name, first, second)
        else:
            layer.set_factors(first, second)
            layer.reset_state(trainer.optimizers)

    def _factor(
        self, trainer: pl.Trainer, name: str, first: torch.Tensor, second: torch.Tensor
    ) -> None:
        assert self._model is not None
        owner = name.rpartition(".")[0]
        module = self._model.get_submodule(owner) if owner else self._model
        layer = FactoredLayer(module, self.layouts[name], first, second)
        layer.swap_into(trainer.optimizers)
        self._owned.clear()
        layer.install()
        layer.write_back()
        self.factored[name] = layer

    def _restore(self, trainer: pl.Trainer) -> None:
        if self._loaded is None:
            for layer in self.factored.values():  # a second fit of the same callback
                layer.swap_into(trainer.optimizers)
                layer.install()
            self._owned.clear()
            return
        state, self._loaded = self._loaded, None
        method = state.get("method", "projected")
        if method != self.method:
            raise ValueError(
                f"{_OWNER}: the checkpoint was written with method={method!r}, this callback "
                f"has method={self.method!r}"
            )
        ranks = {n: int(r) for n, r in state["ranks"].items()}
        unknown = sorted(set(ranks) - set(self.targets))
        if unknown:
            raise ValueError(
                f"the checkpoint holds {_OWNER} state for {unknown}, which this callback does "
                f"not target (targets: {self.targets})"
            )
        bases = dict(state.get("bases", {}))
        factors = dict(state.get("factors", {}))
        for name, rank in ranks.items():
            self._check_restored(name, rank, bases.get(name), factors.get(name))
        self.ranks.update(ranks)
        for name, basis in bases.items():
            self.bases[name] = basis.to(self._model.get_parameter(name))  # type: ignore[union-attr]
        for name, pair in factors.items():
            self._factor(trainer, name, pair["first"], pair["second"])
        self._last_event = int(state.get("last_event", -1))
        self.events = [dict(e) for e in state.get("events", [])]

    def _check_restored(
        self,
        name: str,
        rank: int,
        basis: torch.Tensor | None,
        pair: dict[str, torch.Tensor] | None,
    ) -> None:
        """Raises unless the checkpoint's factors fit ``name``'s weight in this model."""
        shape = self.shapes[name]
        out, reduction = shape[0], math.prod(shape[1:])
        if rank < 1 or rank > full_rank(shape):
            raise ValueError(f"the checkpoint's rank {rank} for {name!r} does not fit {shape}")
        if rank == full_rank(shape):
            return
        matrix = self._matrix(name)
        if self.method == "projected":
            if basis is None or tuple(basis.shape) != (reduction, rank):
                got = None if basis is None else tuple(basis.shape)
                raise ValueError(
                    f"the checkpoint's {_OWNER} basis for {name!r} is {got}, the model's "
                    f"weight at rank {rank} needs {(reduction, rank)}"
                )
            v = orthonormal(basis.to(matrix))
            residual = matrix - (matrix @ v) @ v.T
        else:
            if pair is None or (tuple(pair["first"].shape), tuple(pair["second"].shape)) != (
                (out, rank),
                (rank, reduction),
            ):
                raise ValueError(
                    f"the checkpoint's {_OWNER} factors for {name!r} do not fit its weight "
                    f"{shape} at rank {rank}"
                )
            residual = matrix - pair["first"].to(matrix) @ pair["second"].to(matrix)
        norm = float(matrix.norm()) or 1.0
        if float(residual.norm()) / norm > _RANK_TOLERANCE:
            raise ValueError(
                f"the model's {name!r} is not the weight the checkpoint's {_OWNER} state "
                f"describes (rank {rank}): relative residual {float(residual.norm()) / norm:.3g}"
            )

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per target: ``layer``, ``shape``, ``rank``, ``full_rank``, ``params``, ``dense``."""
        rows = []
        for name in self.targets:
            shape = self.shapes[name]
            rank = self.ranks[name]
            rows.append(
                {
                    "layer": name,
                    "shape": list(shape),
                    "rank": rank,
                    "full_rank": full_rank(shape),
                    "params": factored_params(shape, rank),
                    "dense": math.prod(shape),
                }
            )
        return rows

    def _record_event(
        self, trainer: pl.Trainer, step: int, decisions: dict[str, dict[str, Any]]
    ) -> None:
        rows = self.layer_stats()
        params, dense = sum(r["params"] for r in rows), sum(r["dense"] for r in rows)
        layers = {
            r["layer"]: {
                "rank": r["rank"],
                "energy": decisions[r["layer"]]["energy"],
                "params": r["params"],
            }
            for r in rows
        }
        self.events.append({"step": step, "params": params, "dense": dense, "layers": layers})
        metrics = {"lowrank/params": float(params), "lowrank/compression": dense / params}
        for name, layer in layers.items():
            metrics[f"lowrank/rank/{name}"] = float(layer["rank"])
            metrics[f"lowrank/energy/{name}"] = layer["energy"]
            metrics[f"lowrank/params/{name}"] = float(layer["params"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        rank_zero_only(log.info)(
            "LowRankCallback: step %d: %d of %d parameters (%.2fx)%s",
            step,
            params,
            dense,
            dense / params,
            "".join(
                f"\n  {n}: rank {v['rank']}, energy {v['energy']:.4f}, {v['params']} params"
                for n, v in layers.items()
            ),
        )
        self._log_spectra(trainer, step)

    def _wandb_loggers(self, trainer: pl.Trainer) -> list[Any]:
        from pytorch_lightning.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def _log_spectra(self, trainer: pl.Trainer, step: int) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        for logger in loggers:
            for name, singular in self.spectra.items():
                values = singular.tolist()
                plot = wandb.plot.line_series(
                    xs=list(range(len(values))),
                    ys=[values],
                    keys=[f"step {step}"],
                    title=f"{name}: singular values (rank {self.ranks[name]})",
                    xname="index",
                )
                logger.experiment.log({f"lowrank/spectrum/{name}": plot}, step=step)

    def _log_table(self, trainer: pl.Trainer) -> None:
        if not self.shapes:
            return
        rows = self.layer_stats()
        for logger in self._wandb_loggers(trainer):
            logger.log_table(
                key="lowrank/layers",
                columns=["layer", "shape", "rank", "full_rank", "params", "dense"],
                data=[
                    [
                        r["layer"],
                        str(r["shape"]),
                        r["rank"],
                        r["full_rank"],
                        r["params"],
                        r["dense"],
                    ]
                    for r in rows
                ],
            )
