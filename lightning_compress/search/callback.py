"""``SearchCallback``: per-layer compression learned during training against the latency of
this machine (ProxylessNAS), or chosen by a greedy knapsack over measured sensitivities."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_compress.clock import parse_step, resolve_steps
from lightning_compress.export.latency import LatencyTable, default_path
from lightning_compress.export.modules import unpackable_reason
from lightning_compress.layout import WeightLayout, layout_for_name
from lightning_compress.quantization.layers import split_name
from lightning_compress.quantization.record import CompressionRecord, QuantizedLayer
from lightning_compress.search import estimator
from lightning_compress.search.candidates import Candidate, parse_candidates, thresholds
from lightning_compress.search.choice import Choice
from lightning_compress.search.latency import (
    candidate_latency,
    choice_latency,
    input_shapes,
    model_overhead,
)
from lightning_compress.targets import log_targeting, match_overrides, resolve_targets

log = logging.getLogger(__name__)

METHODS = ("proxyless", "greedy")
DEFAULT_CANDIDATES = ("fp32", "int8", "int4", "s50-int8", "s75-int8", "s90-int8", "s90-int4")
RANK_EVERY = 10
_BUDGET = re.compile(r"^(?P<fraction>[0-9]*\.?[0-9]+)x(?P<reference>[a-z0-9-]+)$")


class SearchCallback(Callback):
    """Learns each targeted layer's compression during training, under a latency budget.

    From ``start`` to ``end`` (steps on the trainer's clock) every optimizer step samples one
    candidate per layer from its architecture parameters (the same on every rank and in a
    resumed run: the sampler is seeded by the step), the layer computes with that candidate's
    weight (masked, fake-quantized), and the parameters take the ProxylessNAS binary-gate
    gradient plus the expected latency's (:mod:`lightning_compress.search.estimator`). Before
    ``start`` the candidates are sampled uniformly (the weights learn to serve all of them) and
    the parameters do not move. At ``end`` each layer keeps its most probable candidate (moved
    onto the budget where the total exceeds it); from then on the layer is held as the user
    would configure it on ``PruneCallback`` (a fixed magnitude mask: zeros in the weight,
    gradients masked) and ``QATCallback`` (its weight fake-quantized per channel) to the end of
    training; :attr:`record` is what ``pack(model, path, qat=search.record)`` writes and
    :meth:`overrides` the choices as those callbacks' per-layer ``overrides``.

    ``method="greedy"`` is the baseline: the model trains dense until ``end``, then each layer's
    accuracy loss with only it compressed each way is measured on the validation split and the
    multiple-choice knapsack picks the least loss under the budget.

    Latency: every candidate of every layer is packed and loaded at ``batch_size`` on this
    machine in ``setup`` (cached in the latency table); the model's own fp32 time less its
    layers' is an overhead added to every prediction.

    Args:
        candidates: Candidate names for every targeted layer (:class:`~lightning_compress.search.
            candidates.Candidate`): ``"fp32"``, ``"int8"``, ``"int4"``, ``"s90-int8"``, ...
        budget: Milliseconds per batch of ``batch_size`` (a float), or a fraction of a uniform
            configuration's predicted latency, as ``"0.5xint8"`` (half of every layer int8).
        batch_size: The batch the model will serve.
        start: First step the architecture parameters learn (the warm-up before it samples
            uniformly).
        end: The step the choices are made.
        method: ``"proxyless"`` or ``"greedy"``.
        include, exclude: Which weights to search (as every callback targets).
        overrides: Candidate lists per name pattern, replacing ``candidates`` for those layers.
        arch_lr: Adam learning rate of the architecture parameters.
        dual_lr: Step of the latency multiplier per optimizer step (per unit of relative excess).
        seed: The sampler's seed.
        example: An input of the model (tensor, tuple or dict), run once to learn each layer's
            input shape and the overhead; default: the module's ``example_input_array``.
            Needed for convolutions.
        latency: A :class:`~lightning_compress.export.latency.LatencyTable`, a path to one, or
            None for the default on-disk cache.
        evaluate: ``method="greedy"``: a function of the module returning a score (higher is
            better) on held-out data; default: the accuracy of ``argmax(module(x))`` over the
            trainer's validation batches ``(x, y)``.
    """

    def __init__(
        self,
        candidates: Sequence[str] | None = DEFAULT_CANDIDATES,
        budget: float | str = "0.5xint8",
        batch_size: int = 1,
        start: str | int = "1ep",
        end: str | int = "5ep",
        method: str = "proxyless",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        overrides: Mapping[str, Sequence[str]] | None = None,
        arch_lr: float = 0.02,
        dual_lr: float = 0.05,
        seed: int = 0,
        example: Any = None,
        latency: LatencyTable | str | None = None,
        evaluate: Callable[[pl.LightningModule], float] | None = None,
        reps: int = 7,
    ) -> None:
        self.candidates = (
            None
            if candidates is None
            else parse_candidates(candidates, "SearchCallback `candidates`")
        )
        self.overrides = {
            str(p): parse_candidates(list(c), f"SearchCallback `overrides`[{p!r}]")
            for p, c in dict(overrides or {}).items()
        }
        if method not in METHODS:
            raise ValueError(f"SearchCallback: `method` must be one of {METHODS}, got {method!r}")
        if batch_size < 1:
            raise ValueError(f"SearchCallback: `batch_size` must be >= 1, got {batch_size}")
        self.budget_arg = budget
        self._check_budget_arg(budget)
        for name, value in (("arch_lr", arch_lr), ("dual_lr", dual_lr)):
            if not value > 0:
                raise ValueError(f"SearchCallback: `{name}` must be > 0, got {value}")
        self.start, self.end = parse_step(start, "start"), parse_step(end, "end")
        self.method, self.batch_size = method, batch_size
        self.include, self.exclude = include, exclude
        self.arch_lr, self.dual_lr, self.seed = arch_lr, dual_lr, seed
        self.example, self.evaluate, self.reps = example, evaluate, reps
        self.table_arg = latency
        # Set in setup.
        self.layers: dict[str, list[Candidate]] = {}
        self.arch: dict[str, Choice] = {}
        self._pairs: dict[str, tuple[int, int | None]] = {}
        self._limits: dict[str, tuple[int, list[float | None]]] = {}
        self._step = 0
        self.layouts: dict[str, WeightLayout] = {}
        self.modules: dict[str, nn.Module] = {}
        self.latency: dict[str, torch.Tensor] = {}
        self.overhead = 0.0
        self.budget = 0.0
        self.alpha: dict[str, torch.Tensor] = {}
        self.lam = 0.0
        self.choices: dict[str, int] | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        # (step, candidate index per layer) of every search step this process ran.
        self.sampled: list[tuple[int, dict[str, int]]] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._steps: dict[str, int | None] = {}
        self._active: dict[str, int] = {}
        self._learning = False
        self._gate_grads: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._saved: dict[str, nn.Parameter] = {}
        self._loaded: dict[str, Any] | None = None
        self._evaluating = False
        self._root: nn.Module | None = None
        self.sensitivity: dict[str, list[float]] = {}

    @staticmethod
    def _check_budget_arg(budget: float | str) -> None:
        if isinstance(budget, str):
            match = _BUDGET.match(budget)
            if match is None:
                raise ValueError(
                    f"SearchCallback: `budget` must be milliseconds (a number) or a fraction of "
                    f"a uniform configuration such as '0.5xint8', got {budget!r}"
                )
            Candidate.parse(match["reference"])
        elif not (isinstance(budget, int | float) and budget > 0):
            raise ValueError(f"SearchCallback: `budget` must be > 0 ms, got {budget!r}")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, include=self.include)

    # -- setup -------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.alpha:
            if self.alpha:
                self._install()
            return
        self._root = pl_module
        modules = dict(pl_module.named_modules())
        self.arch = {n: m for n, m in modules.items() if isinstance(m, Choice)}
        inside = tuple(f"{n}." for n in self.arch)
        names: list[str] = []
        if self.candidates is not None:
            targeting = resolve_targets(
                pl_module, self.include, self.exclude, owner="SearchCallback"
            )
            log_targeting("SearchCallback", targeting)
            names = [n for n in targeting.names if not n.startswith(inside)]
            if len(names) < len(targeting.names):
                rank_zero_only(log.info)(
                    "SearchCallback: the weights inside Choice modules are searched as "
                    "architecture choices, not compressed: %s",
                    sorted(set(targeting.names) - set(names)),
                )
        elif self.include is not None or self.overrides:
            raise ValueError(
                "SearchCallback: `include`/`overrides` select layers to compress, but "
                "`candidates` is None (architecture search only)"
            )
        if not names and not self.arch:
            raise ValueError(
                "SearchCallback: nothing to search: no layer to compress (`candidates` None or "
                "no weight targeted) and no Choice module in the model"
            )
        per_layer = match_overrides(names, self.overrides, "overrides", "SearchCallback")
        for name in names:
            owner, leaf = split_name(name)
            module = modules[owner]
            why = unpackable_reason(module) if leaf == "weight" else "not a layer's weight"
            if why is not None:
                raise ValueError(
                    f"SearchCallback: {name!r} cannot be packed ({why}), so none of its "
                    "candidates can be timed; exclude it"
                )
            assert self.candidates is not None
            self.layers[name] = list(per_layer.get(name, self.candidates))
            self.layouts[name] = layout_for_name(pl_module, name)
            self.modules[name] = module
        self._measure(trainer, pl_module)
        self.budget = self._resolve_budget()
        fastest = estimator.configuration_latency(
            {n: int(t.argmin()) for n, t in self.latency.items()}, self.latency, self.overhead
        )
        if fastest > self.budget:
            raise ValueError(
                f"SearchCallback: `budget`={self.budget_arg!r} is {self.budget:.4f} ms, below "
                f"the fastest configuration of these candidates ({fastest:.4f} ms at batch "
                f"{self.batch_size} on this machine); raise the budget or add faster candidates"
            )
        self.alpha = {
            n: torch.zeros(len(self.option_names(n)), dtype=torch.float64) for n in self.latency
        }
        for t in self.alpha.values():
            t.requires_grad_(True)
        self._optimizer = torch.optim.Adam(
            [self.alpha[n] for n in sorted(self.alpha)], lr=self.arch_lr
        )
        rank_zero_only(log.info)("SearchCallback: %s", self.describe())
        self._install()

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Times every candidate of every layer on rank 0; every rank gets rank 0's figures."""
        example = self.example
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        if self.arch and example is None:
            raise ValueError(
                "SearchCallback: the model has Choice modules; pass `example` (an input of the "
                "model) or set `example_input_array`, so that each candidate can be timed"
            )
        names = [split_name(n)[0] for n in self.layers] + list(self.arch)
        shapes = input_shapes(pl_module, names, example, self.batch_size)
        self._check_choices(shapes)
        if example is not None and torch.is_tensor(example):
            example = example[:1].expand(self.batch_size, *example.shape[1:]).contiguous()
        measured: dict[str, list[float]] = {}
        overhead = 0.0
        if trainer.is_global_zero:
            table = self._table()
            for name, cands in self.layers.items():
                module, shape = self.modules[name], shapes[split_name(name)[0]]
                try:
                    measured[name] = [candidate_latency(module, c, shape, table) for c in cands]
                except (ValueError, RuntimeError) as err:
                    raise ValueError(
                        f"SearchCallback: the latency model cannot measure {name!r}: {err}"
                    ) from err
            for name, choice in self.arch.items():
                measured[name] = choice_latency(choice, shapes[name], table)
            fp32 = {
                n: candidate_latency(
                    self.modules[n], Candidate("fp32", 0.0, None), shapes[split_name(n)[0]], table
                )
                for n in self.layers
            }
            for name in self.arch:
                fp32[name] = measured[name][self._current_index(name)]
            tensor_example = example if torch.is_tensor(example) else None
            overhead = model_overhead(pl_module, tensor_example, fp32, max(31, self.reps))
        measured, overhead = trainer.strategy.broadcast((measured, overhead), src=0)
        self.latency = {n: torch.tensor(v, dtype=torch.float64) for n, v in measured.items()}
        self.overhead = float(overhead)

    def _current_index(self, name: str) -> int:
        choice = self.arch[name]
        return choice.default if choice.chosen is None else choice.chosen

    def _check_choices(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every candidate of a Choice gives the same output shape on its recorded input."""
        for name, choice in self.arch.items():
            x = torch.randn(*shapes[name])
            outs = {}
            with torch.no_grad():
                for label, op in zip(choice.labels, choice.candidates, strict=True):
                    was = op.training
                    op.eval()
                    try:
                        outs[label] = tuple(op(x).shape)
                    except Exception as err:
                        raise ValueError(
                            f"SearchCallback: candidate {label!r} of Choice {name!r} does not "
                            f"run on the input {list(x.shape)}: {err}"
                        ) from err
                    finally:
                        op.train(was)
            if len(set(outs.values())) > 1:
                raise ValueError(
                    f"SearchCallback: the candidates of Choice {name!r} disagree in output "
                    f"shape: {outs}; every candidate must give the same shape"
                )

    def option_names(self, name: str) -> list[str]:
        """The labels of a searched layer's or Choice's candidates."""
        if name in self.arch:
            return list(self.arch[name].labels)
        return [c.name for c in self.layers[name]]

    def _table(self) -> LatencyTable:
        if isinstance(self.table_arg, LatencyTable):
            return self.table_arg
        return LatencyTable(self.table_arg or default_path(), reps=self.reps)

    def _resolve_budget(self) -> float:
        if not isinstance(self.budget_arg, str):
            return float(self.budget_arg)
        match = _BUDGET.match(self.budget_arg)
        assert match is not None
        reference = match["reference"]
        missing = [n for n, c in self.layers.items() if reference not in [x.name for x in c]]
        if missing:
            raise ValueError(
                f"SearchCallback: `budget`={self.budget_arg!r} is relative to {reference!r}, "
                f"which is not a candidate of {missing}"
            )
        uniform = {n: [x.name for x in c].index(reference) for n, c in self.layers.items()}
        uniform.update({n: self._current_index(n) for n in self.arch})
        reference_ms = estimator.configuration_latency(uniform, self.latency, self.overhead)
        return float(match["fraction"]) * reference_ms

    def describe(self) -> str:
        """The searched layers, their candidates' latencies and the budget, as text."""
        lines = [
            f"{self.method} search at batch {self.batch_size}, budget {self.budget:.4f} ms "
            f"(overhead {self.overhead:.4f} ms)"
        ]
        for name in self.latency:
            times = ", ".join(
                f"{c} {float(t):.4f}"
                for c, t in zip(self.option_names(name), self.latency[name], strict=True)
            )
            lines.append(f"  {name}: {times} ms")
        return "\n".join(lines)

    # -- the model's forward -------------------------------------------------------------------

    def _install(self) -> None:
        self._remove()
        for name, choice in self.arch.items():
            choice.sampler = self._choice_sampler(name)
        for name in self.layers:
            module = self.modules[name]
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))

    def _remove(self) -> None:
        for choice in self.arch.values():
            choice.sampler = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def remove(self) -> None:
        """Takes the search's hooks off the model: it computes with its float weights (the
        chosen masks stay as zeros in them)."""
        self._remove()

    @contextlib.contextmanager
    def installed(self) -> Iterator[SearchCallback]:
        """The model computes as it was trained (the chosen candidates) inside the block."""
        self._install()
        try:
            yield self
        finally:
            self._remove()

    def candidate_index(self, name: str) -> int | None:
        """The candidate ``name`` computes with now: the chosen one after the search, the
        sampled one in a training step of the search, the most probable one when evaluating."""
        if self.choices is not None:
            return self.choices[name]
        if self._evaluating or name not in self._active:
            return int(self.alpha[name].argmax()) if self.alpha else None
        return self._active[name]

    def _thresholds(self, name: str, canonical: torch.Tensor) -> list[float | None]:
        """Each candidate's magnitude threshold in the layer. Taken again every
        :data:`RANK_EVERY` steps, at the first forward of the window: the magnitude order moves
        slowly, and a sort of a large layer per step costs more than the step. They are in the
        checkpoint, so a resumed run masks as the uninterrupted one; the chosen candidate's
        mask is exact (a fresh top-k at the choice)."""
        window = self._step // RANK_EVERY
        cached = self._limits.get(name)
        if cached is None or cached[0] != window:
            cached = (window, thresholds(canonical, self.layers[name]))
            self._limits[name] = cached
        return cached[1]

    def _choice_sampler(self, name: str) -> Callable[[], tuple[int, int | None, Any]]:
        def sampler() -> tuple[int, int | None, Any]:
            index = self.candidate_index(name)
            assert index is not None
            choice = self.arch[name]
            if not (self._learning and choice.training and torch.is_grad_enabled()):
                return index, None, None
            second = self._pairs.get(name, (index, None))[1]

            def sink(grads: dict[int, float]) -> None:
                vector = torch.zeros(len(choice.labels), dtype=torch.float64)
                for i, g in grads.items():
                    vector[i] = g
                previous = self._gate_grads.get(name)
                self._gate_grads[name] = vector if previous is None else previous + vector

            return index, second, sink

        return sampler

    def _pre(self, name: str) -> Callable[..., None]:
        _, leaf = split_name(name)

        def hook(module: nn.Module, args: Any) -> None:
            index = self.candidate_index(name)
            if index is None:
                return
            candidate = self.layers[name][index]
            if not candidate.compressed:
                return
            weight = module._parameters[leaf]
            layout = self.layouts[name]
            mask = self.masks.get(name)
            canonical = layout.canonical(weight)
            threshold = None if mask is not None else self._thresholds(name, canonical)[index]
            effective = candidate.weight(canonical, mask, threshold)
            if self._learning and module.training and torch.is_grad_enabled():
                effective.register_hook(self._gate_hook(name))
            self._saved[name] = weight
            module._parameters[leaf] = layout.uncanonical(effective)

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        _, leaf = split_name(name)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            saved = self._saved.pop(name, None)
            if saved is not None:
                module._parameters[leaf] = saved

        return hook

    def _gate_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            # <dL/dW, W_j> for every candidate j: each gate's gradient (module docstring).
            weight = self.layouts[name].canonical(self._parameter(name).detach())
            limits = self._thresholds(name, weight)
            with torch.no_grad():
                grads = torch.stack(
                    [
                        (grad * c.weight(weight, threshold=t)).sum().double()
                        for c, t in zip(self.layers[name], limits, strict=True)
                    ]
                )
            previous = self._gate_grads.get(name)
            self._gate_grads[name] = grads if previous is None else previous + grads

        return hook

    # -- training ------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps = resolve_steps(trainer, start=self.start, end=self.end)
        start, end = self._steps["start"], self._steps["end"]
        assert start is not None and end is not None
        if end <= start:
            raise ValueError(
                f"SearchCallback: `end`={self.end} ({end} steps) must be after `start`="
                f"{self.start} ({start} steps)"
            )
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        if self.choices is not None:
            self._apply_masks()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = self._step = trainer.global_step
        start, end = self._steps["start"], self._steps["end"]
        assert start is not None and end is not None
        if self.choices is None and step >= end:
            self._choose(trainer, pl_module)
        if self.choices is not None:
            self._learning = False
            return
        if self.method == "greedy":
            # The baseline trains the model as it is (dense, Choices at their default).
            if not self._active:
                self._active = {n: self._dense_index(n) for n in self.latency}
            self._learning = False
            return
        self._learning = step >= start
        if self._learning:
            probs = self.probabilities()
        else:
            probs = {
                n: torch.ones(len(a), dtype=torch.float64) / len(a) for n, a in self.alpha.items()
            }
        self._active = estimator.sample_paths(probs, self.seed, step)
        if not self.sampled or self.sampled[-1][0] != step:
            self.sampled.append((step, dict(self._active)))
        generator = estimator.step_generator(self.seed + 1, step)
        self._pairs = {}
        for name in sorted(self.arch):
            rest = probs[name].clone()
            rest[self._active[name]] = 0
            second = int(torch.multinomial(rest, 1, generator=generator))
            self._pairs[name] = (self._active[name], second)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.choices is not None:
            for name, mask in self.masks.items():
                param = self._parameter(name)
                if param.grad is not None:
                    param.grad.mul_(self.layouts[name].uncanonical(mask))
            return
        if not self._learning:
            return
        self._update_architecture(trainer, pl_module)

    def _dense_index(self, name: str) -> int:
        if name in self.arch:
            return self._current_index(name)
        return next((i for i, c in enumerate(self.layers[name]) if not c.compressed), 0)

    def _update_architecture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._optimizer is not None
        names = sorted(self.alpha)
        grads = [
            self._gate_grads.get(n, torch.zeros(len(self.alpha[n]), dtype=torch.float64))
            for n in names
        ]
        self._gate_grads.clear()
        flat = torch.cat(grads)
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
        probs = self.probabilities()
        expected = estimator.expected_latency(probs, self.latency, self.overhead)
        offset = 0
        for name, grad in zip(names, grads, strict=True):
            k = len(grad)
            p = probs[name]
            gates = flat[offset : offset + k].cpu().double()
            if name in self._pairs:
                # Two sampled paths: the estimator over them, their probabilities renormalised.
                pair = list(dict.fromkeys(self._pairs[name]))
                total = torch.zeros(k, dtype=torch.float64)
                total[pair] = estimator.alpha_grad(p[pair] / p[pair].sum(), gates[pair])
            else:
                total = estimator.alpha_grad(p, gates)
            total = total + self.lam / self.budget * estimator.latency_grad(p, self.latency[name])
            self.alpha[name].grad = total
            offset += k
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.lam = max(0.0, self.lam + self.dual_lr * (expected / self.budget - 1.0))

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.choices is not None:
            self._apply_masks()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.alpha:
            return
        probs = self.probabilities()
        expected = estimator.expected_latency(probs, self.latency, self.overhead)
        metrics: dict[str, float] = {
            "search/expected_ms": expected,
            "search/budget_ms": self.budget,
            "search/lambda": self.lam,
        }
        for name, p in probs.items():
            for label, value in zip(self.option_names(name), p, strict=True):
                metrics[f"search/p/{name}/{label}"] = float(value)
        self.history.append(
            {
                "step": trainer.global_step,
                "expected_ms": expected,
                "probs": {n: p.tolist() for n, p in probs.items()},
            }
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluating = True

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluating = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.choices is None:
            rank_zero_only(log.warning)(
                "SearchCallback: training ended before `end`=%s; choosing now", self.end
            )
            self._choose(trainer, pl_module)
        self._log_table(trainer)

    # -- the choice ----------------------------------------------------------------------------

    def probabilities(self) -> dict[str, torch.Tensor]:
        """Each layer's candidate probabilities, ``softmax(alpha)``."""
        return {n: torch.softmax(a.detach(), 0) for n, a in self.alpha.items()}

    def _choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method == "greedy":
            choices = self._greedy(trainer, pl_module)
        else:
            probs = self.probabilities()
            choices = {n: int(p.argmax()) for n, p in probs.items()}
            choices = estimator.fit_budget(choices, probs, self.latency, self.overhead, self.budget)
        # Rank 0 decides (the same on every rank by construction; the broadcast makes it so).
        self.choices = trainer.strategy.broadcast(choices, src=0)
        for name, choice in self.arch.items():
            choice.choose(self.choices[name])
        masks = {}
        for name, index in self.choices.items():
            if name in self.arch:
                continue
            weight = self.layouts[name].canonical(self._parameter(name).detach())
            mask = self.layers[name][index].mask(weight)
            if mask is not None:
                masks[name] = mask
        self.masks = trainer.strategy.broadcast({n: m.cpu() for n, m in masks.items()}, src=0)
        self._apply_masks()
        self._learning = False
        rank_zero_only(log.info)("SearchCallback: chose\n%s", self.summary())

    def _greedy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
        evaluate = self.evaluate or _validation_accuracy(trainer)
        was = pl_module.training
        pl_module.eval()
        dense = {n: self._dense_index(n) for n in self.latency}
        try:
            self._evaluating = False
            self.choices = dict(dense)
            base = float(evaluate(pl_module))
            drops: dict[str, list[float]] = {}
            for name in sorted(self.latency):
                drops[name] = []
                for j in range(len(self.alpha[name])):
                    self.choices = {**dense, name: j}
                    drops[name].append(base - float(evaluate(pl_module)))
        finally:
            self.choices = None
            pl_module.train(was)
        self.sensitivity = drops
        capacity = self.budget - self.overhead
        return estimator.knapsack(drops, {n: t.tolist() for n, t in self.latency.items()}, capacity)

    def _parameter(self, name: str) -> nn.Parameter:
        return self.modules[name]._parameters[split_name(name)[1]]

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for name, mask in self.masks.items():
            param = self._parameter(name)
            param.mul_(self.layouts[name].uncanonical(mask.to(param.device)).to(param.dtype))

    def chosen(self) -> dict[str, str]:
        """Each layer's chosen candidate name (empty before the choice)."""
        if self.choices is None:
            return {}
        return {n: self.option_names(n)[i] for n, i in self.choices.items()}

    def predicted_ms(self) -> float:
        """The chosen configuration's predicted latency (overhead included)."""
        if self.choices is None:
            raise RuntimeError("SearchCallback: nothing chosen yet")
        return estimator.configuration_latency(self.choices, self.latency, self.overhead)

    def overrides_for(self) -> dict[str, dict[str, float | int]]:
        """The choices as the per-layer ``overrides`` of ``PruneCallback`` (sparsity) and
        ``QATCallback`` (bits), by module name."""
        prune: dict[str, float | int] = {}
        qat: dict[str, float | int] = {}
        for name, index in (self.choices or {}).items():
            if name in self.arch:
                continue
            candidate = self.layers[name][index]
            owner = split_name(name)[0]
            if candidate.sparsity > 0:
                prune[owner] = candidate.sparsity
            if candidate.bits is not None:
                qat[owner] = candidate.bits
        return {"prune": prune, "qat": qat}

    @property
    def record(self) -> CompressionRecord | None:
        """The chosen quantized layers' integers (what ``pack(..., qat=...)`` writes); None
        before the choice. Layers that chose ``fp32`` are not in it and stay fp32."""
        if self.choices is None:
            return None
        layers = []
        for name, index in self.choices.items():
            if name in self.arch:
                continue
            candidate = self.layers[name][index]
            if candidate.bits is None:
                continue
            weight = self.layouts[name].canonical(self._parameter(name).detach())
            mask = self.masks.get(name)
            if mask is not None:
                weight = weight * mask.to(weight.device)
            layers.append(QuantizedLayer.from_weight(name, weight, candidate.bits))
        return CompressionRecord(layers, root=self._root)

    def summary(self) -> str:
        """The chosen candidate of each layer with its predicted latency, and the total."""
        lines = []
        for name, index in (self.choices or {}).items():
            label, ms = self.option_names(name)[index], float(self.latency[name][index])
            lines.append(f"  {name}: {label} ({ms:.4f} ms)")
        if self.choices is not None:
            lines.append(f"  predicted {self.predicted_ms():.4f} ms, budget {self.budget:.4f} ms")
        return "\n".join(lines)

    def _log_table(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.loggers import WandbLogger

        if self.choices is None:
            return
        rows = [
            [n, self.option_names(n)[i], float(self.latency[n][i])] for n, i in self.choices.items()
        ]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key="search/choices", columns=["layer", "candidate", "predicted_ms"], data=rows
                )

    # -- checkpoint ----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": 1,
            "layers": {n: self.option_names(n) for n in self.latency},
            "alpha": {n: a.detach().clone() for n, a in self.alpha.items()},
            "lambda": self.lam,
            "latency": {n: t.clone() for n, t in self.latency.items()},
            "overhead": self.overhead,
            "budget": self.budget,
            "choices": None if self.choices is None else dict(self.choices),
            "masks": {n: m.cpu().clone() for n, m in self.masks.items()},
            "thresholds": {n: [w, list(t)] for n, (w, t) in self._limits.items()},
        }
        if self._optimizer is not None:
            state["optimizer"] = self._optimizer.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(
                f"SearchCallback: unknown checkpoint state version {state.get('version')!r}"
            )
        layers = {n: self.option_names(n) for n in self.latency}
        if state["layers"] != layers:
            raise ValueError(
                "SearchCallback: the checkpoint searched other layers or candidates "
                f"({state['layers']}) than this callback ({layers})"
            )
        with torch.no_grad():
            for name, value in state["alpha"].items():
                self.alpha[name].copy_(value)
        self.lam = float(state["lambda"])
        self.latency = {n: t.clone() for n, t in state["latency"].items()}
        self.overhead, self.budget = float(state["overhead"]), float(state["budget"])
        self.choices = (
            None if state["choices"] is None else {n: int(i) for n, i in state["choices"].items()}
        )
        self.masks = {n: m.clone() for n, m in state["masks"].items()}
        self._limits = {n: (int(w), list(t)) for n, (w, t) in state.get("thresholds", {}).items()}
        for name, choice in self.arch.items():
            if self.choices is not None:
                choice.choose(self.choices[name])
        if self._optimizer is not None and "optimizer" in state:
            self._optimizer.load_state_dict(state["optimizer"])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._learning = False


def _validation_accuracy(trainer: pl.Trainer) -> Callable[[pl.LightningModule], float]:
    """Accuracy of ``argmax(module(x))`` over the trainer's validation batches ``(x, y)``."""

    def evaluate(module: pl.LightningModule) -> float:
        loaders = trainer.val_dataloaders
        if loaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        if loaders is None:
            raise ValueError(
                "SearchCallback(method='greedy') measures sensitivity on the validation split: "
                "give the trainer validation data or pass `evaluate`"
            )
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        correct = total = 0
        with torch.no_grad():
            for loader in loaders:
                for batch in loader:
                    if not (isinstance(batch, list | tuple) and len(batch) == 2):
                        raise ValueError(
                            "SearchCallback(method='greedy'): validation batches are not (x, y) "
                            "pairs; pass `evaluate` (a function of the module returning a score)"
                        )
                    x, y = batch
                    x, y = x.to(module.device), y.to(module.device)
                    correct += int((module(x).argmax(-1) == y).sum())
                    total += int(y.numel())
        return correct / max(total, 1)

    return evaluate
