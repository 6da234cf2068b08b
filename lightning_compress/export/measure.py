"""Accuracy and latency of a packed artifact against the network it was packed from.

One measurement for every place that reports a packed model (the training job's
``results.json``, ``lightning-compress-artifact bench``, the examples): reload the artifact into a
copy with :func:`~lightning_compress.export.load_into`, score both on the same loader, and time
both on the same inputs, taking turns so that a machine's drift hits both alike.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.export.artifact import load_into


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over a DataLoader of (x, y) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=-1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def latency(
    models: dict[str, nn.Module], example: torch.Tensor, batches: list[int], reps: int = 15
) -> dict[str, dict[int, float]]:
    """Median milliseconds per forward, per model and batch size, the models taking turns."""
    out: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in batches:
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        times: dict[str, list[float]] = {name: [] for name in models}
        calls = max(1, 256 // batch)  # enough calls per sample to rise above the timer's noise
        for rep in range(reps + 2):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(calls):
                    model(x)
                if rep >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - start) / calls)
        for name in models:
            out[name][batch] = 1e3 * statistics.median(times[name])
    return out


@dataclass(frozen=True)
class PackedComparison:
    """A packed artifact measured against its network.

    Args:
        reference_acc: The network's accuracy (as ``reference`` had it compute).
        packed_acc: The reloaded artifact's accuracy.
        latency_ms: Median ms per forward, ``{"dense": {batch: ms}, "packed": {batch: ms}}``;
            "dense" is the network with its float weights.
    """

    reference_acc: float
    packed_acc: float
    latency_ms: dict[str, dict[int, float]]


def compare_packed(
    model: nn.Module,
    path: str | os.PathLike,
    loader: Iterable[Any],
    batches: list[int],
    reps: int = 15,
    reference: contextlib.AbstractContextManager[Any] | None = None,
) -> PackedComparison:
    """Reloads ``path`` into a copy of ``model``, scores both on ``loader`` and times both.

    Args:
        model: The network the artifact was packed from (left unchanged).
        path: The artifact.
        loader: (x, y) batches; its first batch's first input is the timing example.
        batches: Batch sizes to time.
        reps: Timed rounds per batch size (after two warm-up rounds).
        reference: Entered around the network's scoring, so it can compute the model as
            trained (a QAT model's hooks, ``qat.layers.installed()``); default: as it is.
    """
    packed = load_into(copy.deepcopy(model), path)
    example = next(iter(loader))[0]
    with reference or contextlib.nullcontext():
        reference_acc = evaluate(model, loader)
    packed_acc = evaluate(packed, loader)
    times = latency({"dense": model, "packed": packed}, example, batches, reps)
    return PackedComparison(reference_acc, packed_acc, times)
