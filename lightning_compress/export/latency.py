"""Measured latency of each way to run a packed layer, and the choice of the fastest.

A packed layer can compute its product several ways (:data:`~lightning_compress.export.modules.
IMPLEMENTATIONS`): which one is fastest depends on its shape, its sparsity, the batch, and the
machine. Nothing here guesses: :class:`LatencyTable` times each candidate module on an input of
the layer's shape on the machine it runs on (median of interleaved repetitions, after a warm-up)
and keeps the result in a versioned JSON file keyed by the CPU model, the thread count and the
torch and package versions, so a second load of the same shapes measures nothing.
:func:`choose` returns the fastest candidate. Trainer-free: ``load_into(..., batch_size=...)``
uses it, and so can a search over compression choices.

A layer is measured warm (its weights left in the cache by the call before) or cold (the
last-level cache flushed before every call): ``load_into`` measures cold when the model's packed
weights exceed the last-level cache, since each layer then reads its weights from memory, as it
will in the model.

Prediction: a table with ``predict=True`` answers a linear layer it has not measured from the
ones it has (same implementation, kind, bits, activations and cache state), by piecewise-linear
interpolation in density, then in the weight's size (``out * in``), then in the number of rows
of the input (the batch); beyond the measured sizes and batches it scales in proportion (the
product's cost grows with both), below them it keeps the smallest measured time (the per-call
overhead). :meth:`LatencyTable.calibrate` measures a grid to predict from. A model's predicted
latency is the sum of its layers'.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "lightning-compress-latency"
FORMAT_VERSION = 2
CACHE_ENV = "LIGHTNING_COMPRESS_LATENCY_CACHE"


@dataclass(frozen=True)
class LayerSpec:
    """What a packed layer's latency depends on, besides the implementation.

    Args:
        kind: ``"linear"`` or ``"conv2d"``.
        out_features: Rows of the weight matrix (N).
        in_features: Columns of the weight matrix (K; ``in/groups * kh * kw`` for a conv).
        bits: Weight bits as stored (8 or 4).
        density: Non-zeros over ``N * K``, in [0, 1] (kept to two decimals in the key).
        act: Whether the output is fake-quantized to a recorded range.
        input: The layer's input shape, batch first.
        conv: The convolution's parameters (None for a linear layer).
        cold: Measured with the last-level cache flushed before every call.
    """

    kind: str
    out_features: int
    in_features: int
    bits: int
    density: float
    act: bool = False
    input: tuple[int, ...] = ()
    conv: str | None = None
    cold: bool = False

    @property
    def rows(self) -> int:
        """Rows of the product: every input dimension but the last (a linear layer's batch)."""
        return math.prod(self.input[:-1]) if len(self.input) > 1 else 1

    @property
    def size(self) -> int:
        """Weights in the matrix: ``out * in``."""
        return self.out_features * self.in_features

    def key(self) -> str:
        """The table key: every field, the density to two decimals."""
        return (
            f"{self.kind}|{self.out_features}x{self.in_features}|int{self.bits}"
            f"|density={self.density:.2f}|act={self.act}|conv={self.conv}"
            f"|input={'x'.join(map(str, self.input))}|cold={self.cold}"
        )

    @classmethod
    def parse(cls, key: str) -> LayerSpec | None:
        """The spec a :meth:`key` was made from; None for a key of another form."""
        try:
            kind, shape, bits, density, act, conv, shape_in, cold = key.split("|")
            n, k = (int(v) for v in shape.split("x"))
            return cls(
                kind,
                n,
                k,
                int(bits.removeprefix("int")),
                float(density.removeprefix("density=")),
                act == "act=True",
                tuple(int(v) for v in shape_in.removeprefix("input=").split("x") if v),
                None if conv == "conv=None" else conv.removeprefix("conv="),
                cold == "cold=True",
            )
        except ValueError:
            return None

    def family(self) -> tuple[Any, ...]:
        """What must match for one measurement to predict another: all but size, density and
        the input's rows."""
        return (self.kind, self.bits, self.act, self.conv, self.cold, len(self.input))


def last_level_cache_bytes() -> int:
    """The largest CPU cache the kernel reports (the L3, as a rule); 32 MiB where unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=32 << 20)


# A virtual machine reports its host's last-level cache (480 MiB on some servers), shared with
# every other tenant: no more than this much of it is taken to keep a model's weights.
CACHE_CAP = 64 << 20


def cache_bytes() -> int:
    """The cache a model's weights can stay in between calls: the last-level cache, at most
    :data:`CACHE_CAP`. Weights beyond it are read from memory on every call (cold)."""
    return min(last_level_cache_bytes(), CACHE_CAP)


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``platform.processor()`` where it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What a measurement depends on besides the layer: CPU, threads, library versions."""
    try:
        version = metadata.version("lightning-compress")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning_compress": version,
    }


def default_path() -> Path:
    """``$LIGHTNING_COMPRESS_LATENCY_CACHE``, else ``~/.cache/lightning-compress/latency.json``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "lightning-compress" / "latency.json"


@torch.no_grad()
def time_modules(
    modules: dict[str, nn.Module],
    make_input: Callable[[], Any],
    reps: int = 7,
    cold: bool = False,
) -> dict[str, float]:
    """Median milliseconds per forward of each module on the same input, the modules taking
    turns (so that the machine's drift hits all alike), after two warm-up rounds. ``cold``:
    the cache is flushed (a buffer of twice :func:`cache_bytes` is read) before every call."""
    x = make_input()
    flush = torch.ones(2 * cache_bytes() // 4) if cold else None
    times: dict[str, list[float]] = {name: [] for name in modules}
    for rep in range(reps + 2):
        for name, module in modules.items():
            if flush is not None:
                flush.sum()
            start = time.perf_counter()
            module(x)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _interpolate(points: Sequence[tuple[float, float]], at: float, scale_up: bool) -> float:
    """Piecewise-linear through ``points`` (x, y) sorted by x. Below the first: its y; beyond
    the last: its y, times ``at / x`` where ``scale_up``."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, at)
    if i < len(xs) and xs[i] == at:
        return points[i][1]
    if i == 0:
        return points[0][1]
    if i == len(xs):
        x, y = points[-1]
        return y * at / x if scale_up and x > 0 else y
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


class LatencyTable:
    """Measured milliseconds per (implementation, :class:`LayerSpec`), cached on disk.

    Args:
        path: The JSON file (None: in memory only). A file written on another machine, by other
            versions or in another format is ignored (and replaced on save), never trusted.
        reps: Timed repetitions per measurement.
        predict: Answer a linear layer not yet measured from the measured ones
            (:meth:`predict`) instead of measuring it, wherever the table can.
    """

    def __init__(
        self, path: str | os.PathLike | None = None, reps: int = 7, predict: bool = False
    ) -> None:
        self.path = None if path is None else Path(path)
        self.reps = reps
        self.predicting = predict
        self.machine = machine()
        self.entries: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = None
            if (
                isinstance(data, dict)
                and data.get("format") == FORMAT
                and data.get("format_version") == FORMAT_VERSION
                and data.get("machine") == self.machine
                and isinstance(data.get("entries"), dict)
            ):
                self.entries = {str(k): float(v) for k, v in data["entries"].items()}

    def measure(
        self,
        layer: LayerSpec,
        candidates: dict[str, Callable[[], nn.Module]],
        make_input: Callable[[], Any],
    ) -> dict[str, float]:
        """Milliseconds of each candidate (built only when neither in the table nor, with
        ``predict``, predictable) for ``layer``."""
        times: dict[str, float] = {}
        for impl in candidates:
            known = self.entries.get(self._key(impl, layer))
            if known is None and self.predicting:
                known = self.predict(impl, layer)
            if known is not None:
                times[impl] = known
        missing = {impl: build for impl, build in candidates.items() if impl not in times}
        if missing:
            built = {impl: build() for impl, build in missing.items()}
            for impl, ms in time_modules(built, make_input, self.reps, layer.cold).items():
                self.entries[self._key(impl, layer)] = times[impl] = ms
            self.save()
        return {impl: times[impl] for impl in candidates}

    def predict(self, impl: str, layer: LayerSpec) -> float | None:
        """Milliseconds of ``impl`` on ``layer`` from the measurements of its family (see the
        module's docstring); None where there are none to predict from (and for convolutions,
        whose time depends on the image as well as the matrix)."""
        known = self.entries.get(self._key(impl, layer))
        if known is not None or layer.kind != "linear":
            return known
        family = layer.family()
        # rows -> size -> (n, k) -> [(density, ms)]
        grid: dict[int, dict[int, dict[tuple[int, int], list[tuple[float, float]]]]] = {}
        for key, ms in self.entries.items():
            found_impl, _, rest = key.partition("|")
            spec = LayerSpec.parse(rest) if found_impl == impl else None
            if spec is None or spec.family() != family:
                continue
            shape = (spec.out_features, spec.in_features)
            by_size = grid.setdefault(spec.rows, {}).setdefault(spec.size, {})
            by_size.setdefault(shape, []).append((spec.density, ms))
        if not grid:
            return None

        def at_rows(sizes: dict[int, dict[tuple[int, int], list[tuple[float, float]]]]) -> float:
            def at_size(shapes: dict[tuple[int, int], list[tuple[float, float]]]) -> float:
                shape = (layer.out_features, layer.in_features)
                chosen = [shapes[shape]] if shape in shapes else list(shapes.values())
                return statistics.fmean(
                    _interpolate(sorted(p), layer.density, scale_up=False) for p in chosen
                )

            return _interpolate(
                [(size, at_size(shapes)) for size, shapes in sorted(sizes.items())],
                layer.size,
                scale_up=True,
            )

        return _interpolate(
            [(rows, at_rows(sizes)) for rows, sizes in sorted(grid.items())],
            layer.rows,
            scale_up=True,
        )

    def calibrate(
        self,
        layers: Sequence[LayerSpec],
        build: Callable[[str, LayerSpec], nn.Module],
        impls: Sequence[str],
    ) -> None:
        """Measures every implementation in ``impls`` on every layer of ``layers`` (a grid of
        shapes, densities and batches for :meth:`predict` to interpolate in); ``build(impl,
        layer)`` makes the module. Already measured pairs are not measured again."""
        for layer in layers:
            candidates = {impl: functools.partial(build, impl, layer) for impl in impls}
            was, self.predicting = self.predicting, False
            try:
                self.measure(layer, candidates, functools.partial(torch.randn, *layer.input))
            finally:
                self.predicting = was

    def save(self) -> None:
        """Writes the table (atomically) where it has a path."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "machine": self.machine,
            "entries": self.entries,
        }
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(self.path)

    @staticmethod
    def _key(impl: str, layer: LayerSpec) -> str:
        return f"{impl}|{layer.key()}"


def choose(
    table: LatencyTable,
    layer: LayerSpec,
    candidates: dict[str, Callable[[], nn.Module]],
    make_input: Callable[[], Any],
    prefer: str | None = "fp32",
    margin: float = 0.1,
) -> tuple[str, dict[str, float]]:
    """The fastest candidate for ``layer`` and every candidate's measured milliseconds.

    ``prefer`` (the fp32 layer, which is what the model ran before packing) is kept unless
    another candidate measured at least ``margin`` faster: a layer's time in the model differs
    from its time alone by more than the noise between close candidates, and a wrong pick
    against fp32 makes the packed model slower than the model it came from.
    """
    times = table.measure(layer, candidates, make_input)
    best = min(times, key=times.__getitem__)
    if prefer in times and times[best] > (1.0 - margin) * times[prefer]:
        best = prefer
    return best, times


def run_example(model: nn.Module, example: Any) -> Any:
    """``model`` on ``example``: a tensor, a tuple of positional arguments or a dict of keyword
    arguments."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple | list):
        return model(*example)
    return model(example)


@dataclass(frozen=True)
class LayerLatency:
    """One packed layer in a :class:`ModelLatency`: its implementation, the milliseconds the
    latency table gave for it (measured alone, or predicted) and those it took in the model."""

    name: str
    impl: str
    predicted_ms: float
    measured_ms: float


@dataclass(frozen=True)
class ModelLatency:
    """Predicted against measured latency of a model ``load_into(..., batch_size=...)`` loaded.

    ``predicted_ms`` is the sum of the packed layers' table times; ``measured_ms`` the whole
    model's median forward, ``packed_ms`` the part of it spent in the packed layers (the rest is
    the layers that were not packed, activations, and Python).
    """

    layers: tuple[LayerLatency, ...]
    predicted_ms: float
    measured_ms: float
    packed_ms: float
    cold: bool

    def __str__(self) -> str:
        width = max([24, *(len(r.name) for r in self.layers)])
        lines = [f"{'layer':<{width}} {'impl':<9} {'predicted ms':>12} {'measured ms':>12}"]
        lines += [
            f"{r.name:<{width}} {r.impl:<9} {r.predicted_ms:>12.3f} {r.measured_ms:>12.3f}"
            for r in self.layers
        ]
        error = self.predicted_ms / max(self.packed_ms, 1e-12) - 1
        lines.append(
            f"{'packed layers':<{width}} {'':<9} {self.predicted_ms:>12.3f} "
            f"{self.packed_ms:>12.3f}  ({100 * error:+.1f}%)"
        )
        lines.append(
            f"{'whole model':<{width}} {'':<9} {'':>12} {self.measured_ms:>12.3f}"
            f"  ({'cold' if self.cold else 'warm'} cache)"
        )
        return "\n".join(lines)


@torch.no_grad()
def model_latency(model: nn.Module, example: Any, reps: int = 7) -> ModelLatency:
    """Times ``model`` on ``example`` (a tensor, a tuple of positional arguments or a dict of
    keyword arguments) in eval mode, and each of its packed layers inside it, against what the
    latency table said when ``load_into(..., batch_size=...)`` chose their implementations.

    Median of ``reps`` forwards after two warm-ups; the last-level cache is flushed before each
    where the layers were measured cold.

    Raises:
        ValueError: ``model`` has no layer loaded with ``batch_size`` (nothing was predicted).
    """
    chosen = {n: m for n, m in model.named_modules() if hasattr(m, "latency_spec")}
    if not chosen:
        raise ValueError(
            "the model has no layer loaded by load_into(..., batch_size=...): nothing to "
            "compare the measured latency with"
        )
    cold = any(m.latency_spec.cold for m in chosen.values())
    spent: dict[str, float] = {}
    started: dict[str, float] = {}

    def before(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            started[name] = time.perf_counter()

        return hook

    def after(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]

        return hook

    handles = [
        h
        for n, m in chosen.items()
        for h in (m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n)))
    ]
    flush = torch.ones(2 * cache_bytes() // 4) if cold else None
    modes = {m: m.training for m in model.modules()}
    model.eval()
    totals: list[float] = []
    per_layer: dict[str, list[float]] = {n: [] for n in chosen}
    try:
        for rep in range(reps + 2):
            if flush is not None:
                flush.sum()
            spent.clear()
            start = time.perf_counter()
            run_example(model, example)
            if rep >= 2:
                totals.append(time.perf_counter() - start)
                for n in chosen:
                    per_layer[n].append(spent.get(n, 0.0))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    layers = tuple(
        LayerLatency(n, m.impl, m.latency_ms[m.impl], 1e3 * statistics.median(per_layer[n]))
        for n, m in chosen.items()
    )
    return ModelLatency(
        layers,
        sum(r.predicted_ms for r in layers),
        1e3 * statistics.median(totals),
        sum(r.measured_ms for r in layers),
        cold,
    )
