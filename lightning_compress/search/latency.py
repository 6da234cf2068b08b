"""Each candidate's latency in each layer, measured on this machine through the packed path.

A compressed candidate is measured as it will serve: the layer alone, pruned and quantized as
the candidate says, written by :func:`~lightning_compress.export.pack` and loaded by
:func:`~lightning_compress.export.load_into` at the search's batch, which times every packed
implementation (kept in the :class:`~lightning_compress.export.latency.LatencyTable`) and keeps
the fastest; the candidate's latency is that one's. ``fp32`` is the layer itself. What the
layers do not account for (activations, pooling, Python) is the model's fp32 time less its
layers' fp32 times: the overhead, added to every configuration's prediction.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.export.artifact import layer_input_shapes, load_into, pack
from lightning_compress.export.latency import LatencyTable, LayerSpec, run_example, time_modules
from lightning_compress.layout import layout_of
from lightning_compress.quantization.record import CompressionRecord, QuantizedLayer
from lightning_compress.search.candidates import Candidate


def _conv_key(module: nn.Module) -> str | None:
    if not isinstance(module, nn.Conv2d):
        return None
    keys = ("kernel_size", "stride", "padding", "dilation", "groups")
    return json.dumps(
        {k: list(getattr(module, k)) if k != "groups" else module.groups for k in keys}
    )


def _fp32_spec(module: nn.Module, shape: tuple[int, ...]) -> LayerSpec:
    layout = layout_of(module)
    assert layout is not None
    weight = layout.canonical(module.weight)
    kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
    return LayerSpec(
        kind, weight.shape[0], weight[0].numel(), 32, 1.0, False, shape, _conv_key(module)
    )


def candidate_latency(
    module: nn.Module,
    candidate: Candidate,
    shape: tuple[int, ...],
    table: LatencyTable,
) -> float:
    """Milliseconds per call of ``module`` compressed as ``candidate`` on an input of ``shape``
    (batch first), in the packed implementation ``load_into`` would pick."""
    layer = copy.deepcopy(module).eval()
    if not candidate.compressed:
        spec = _fp32_spec(module, shape)
        return table.measure(spec, {"fp32": lambda: layer}, lambda: torch.randn(*shape))["fp32"]
    layout = layout_of(layer)
    assert layout is not None and candidate.bits is not None
    with torch.no_grad():
        weight = candidate.weight(layout.canonical(layer.weight.detach()))
    wrapper = nn.Sequential()
    wrapper.add_module("layer", layer)
    record = CompressionRecord([QuantizedLayer.from_weight("layer.weight", weight, candidate.bits)])
    with tempfile.TemporaryDirectory() as tmp:
        path = pack(wrapper, Path(tmp) / "layer.safetensors", qat=record)
        load_into(
            wrapper,
            path,
            batch_size=shape[0],
            example=torch.randn(*shape),
            exact=True,
            latency=table,
        )
    chosen = wrapper.layer
    return float(chosen.latency_ms[chosen.impl])


def input_shapes(
    model: nn.Module, names: list[str], example: Any, batch_size: int
) -> dict[str, tuple[int, ...]]:
    """Each named module's input shape (batch dimension set to ``batch_size``) in one eval-mode
    forward of ``example``; without an example, ``(batch_size, in_features)`` for linear layers.

    Raises:
        ValueError: A convolution and no example; an example the model cannot run.
    """
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    if example is None:
        for name in names:
            module = modules[name]
            if isinstance(module, nn.Conv2d):
                raise ValueError(
                    f"SearchCallback: {name!r} is a convolution; its latency depends on its input "
                    "size: pass `example` (an input of the model) or set the module's "
                    "`example_input_array`"
                )
            layout = layout_of(module)
            assert layout is not None
            shapes[name] = (batch_size, layout.in_features(module.weight))
        return shapes

    shapes = layer_input_shapes(model, example, names, batch_size)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(
            f"SearchCallback: {missing} did not run on `example`; a layer the forward does not "
            "call cannot be timed (exclude it)"
        )
    return shapes


class _Forward(nn.Module):
    def __init__(self, model: nn.Module, example: Any) -> None:
        super().__init__()
        self.model, self.example = model, example

    def forward(self, _: Any) -> Any:
        return run_example(self.model, self.example)


def model_overhead(
    model: nn.Module,
    example: Any,
    layer_ms: dict[str, float],
    reps: int,
) -> float:
    """The model's fp32 milliseconds on ``example`` less the sum of its targeted layers' fp32
    milliseconds (``layer_ms``), at least 0; 0 without an example."""
    if example is None:
        return 0.0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        whole = time_modules({"model": _Forward(model, example)}, lambda: None, reps)["model"]
    finally:
        for m, mode in modes.items():
            m.training = mode
    return max(0.0, whole - sum(layer_ms.values()))


def choice_latency(choice: nn.Module, shape: tuple[int, ...], table: LatencyTable) -> list[float]:
    """Milliseconds per call of each candidate of a :class:`~lightning_compress.search.Choice`
    on an input of ``shape``, in fp32 (the table keys each by its ``repr`` and input)."""
    times = []
    for op in choice.candidates:
        layer = copy.deepcopy(op).eval()
        spec = LayerSpec("module", 0, 0, 32, 1.0, False, shape, repr(op))
        times.append(
            table.measure(spec, {"fp32": lambda layer=layer: layer}, lambda: torch.randn(*shape))[
                "fp32"
            ]
        )
    return times
