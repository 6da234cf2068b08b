"""Measured latency of each way to run a packed layer, and the choice of the fastest.

A packed layer can compute its product several ways (:data:`~lightning_compress.export.modules.
IMPLEMENTATIONS`): which one is fastest depends on its shape, its sparsity, the batch, and the
machine. Nothing here guesses: :class:`LatencyTable` times each candidate module on an input of
the layer's shape on the machine it runs on (median of interleaved repetitions, after a warm-up)
and keeps the result in a versioned JSON file keyed by the CPU model, the thread count and the
torch and package versions, so a second load of the same shapes measures nothing.
:func:`choose` returns the fastest candidate. Trainer-free: ``load_into(..., batch_size=...)``
uses it, and so can a search over compression choices.

Measurements are of one layer with its weights as they are (warm in the cache when they fit):
a model whose layers each fit in the last-level cache but together do not is slower than the
sum of its measured layers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "lightning-compress-latency"
FORMAT_VERSION = 1
CACHE_ENV = "LIGHTNING_COMPRESS_LATENCY_CACHE"


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
    modules: dict[str, nn.Module], make_input: Callable[[], Any], reps: int = 7
) -> dict[str, float]:
    """Median milliseconds per forward of each module on the same input, the modules taking
    turns (so that the machine's drift hits all alike), after two warm-up rounds."""
    x = make_input()
    times: dict[str, list[float]] = {name: [] for name in modules}
    for rep in range(reps + 2):
        for name, module in modules.items():
            start = time.perf_counter()
            module(x)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


class LatencyTable:
    """Measured milliseconds per (implementation, layer description), cached on disk.

    Args:
        path: The JSON file (None: in memory only). A file written on another machine, by other
            versions or in another format is ignored (and replaced on save), never trusted.
        reps: Timed repetitions per measurement.
    """

    def __init__(self, path: str | os.PathLike | None = None, reps: int = 7) -> None:
        self.path = None if path is None else Path(path)
        self.reps = reps
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
        self, layer: str, candidates: dict[str, Callable[[], nn.Module]], make_input: Callable
    ) -> dict[str, float]:
        """Milliseconds of each candidate (built only when not yet in the table) for ``layer``,
        a description of the layer and its input that names what the time depends on."""
        missing = {
            impl: build
            for impl, build in candidates.items()
            if self._key(impl, layer) not in self.entries
        }
        if missing:
            built = {impl: build() for impl, build in missing.items()}
            for impl, ms in time_modules(built, make_input, self.reps).items():
                self.entries[self._key(impl, layer)] = ms
            self.save()
        return {impl: self.entries[self._key(impl, layer)] for impl in candidates}

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
    def _key(impl: str, layer: str) -> str:
        return f"{impl}|{layer}"


def choose(
    table: LatencyTable,
    layer: str,
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
