"""Fake quantization installed on a model's own layers through forward hooks.

The targeted parameters keep their names and the user's ``forward`` keeps its signature: a
forward pre-hook swaps each targeted parameter for its fake-quantized value for the duration of
the layer's call, and a forward hook (``always_call``, so an exception cannot leave it swapped)
puts the parameter back and fake-quantizes the layer's output.

Conv followed by BatchNorm (found in registration order, as ``Sequential(conv, bn)`` or
``conv1``/``bn1`` pairs declare them) is quantized as Jacob et al. 2018 fold it: the weight that
is quantized is ``w * gamma / sqrt(running_var + eps)``, the fold of BN into the conv, and the
conv then uses that quantized fold divided back, so BN still normalises as in training while
the integers are those of the folded layer.

A weight with a :class:`~lightning_compress.quantization.kmeans.SharedWeight` in
``FakeQuantLayers.shared`` (weight sharing) is swapped for its centroids instead, through the
same hooks; it is never folded.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_compress.layout import STANDARD, WeightLayout
from lightning_compress.quantization.fake import (
    ActivationObserver,
    channel_view,
    fake_quant_weight,
    lsq_fake_quant_weight,
)
from lightning_compress.quantization.kmeans import SharedWeight
from lightning_compress.quantization.record import (
    ActivationRange,
    CompressionRecord,
    LayerRecord,
    QuantizedLayer,
)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Conv module name -> the BatchNorm registered right after it with matching channels."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, CONV_TYPES + BN_TYPES)]
    pairs = {}
    for (name, module), (next_name, following) in itertools.pairwise(named):
        if (
            isinstance(module, CONV_TYPES)
            and isinstance(following, BN_TYPES)
            and following.num_features == module.out_channels
        ):
            pairs[name] = next_name
    return pairs


def split_name(name: str) -> tuple[str, str]:
    """``"net.fc1.weight"`` -> ``("net.fc1", "weight")``: the owning module and the leaf."""
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def fold_scale(bn: nn.Module) -> torch.Tensor:
    """gamma / sqrt(running_var + eps) per channel (detached), never exactly zero."""
    var = bn.running_var.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    tiny = torch.full_like(scale, 1e-8)
    return torch.where(scale.abs() < 1e-8, tiny, scale)


class FakeQuantLayers:
    """Hooks fake-quantizing the targeted weights (and optionally outputs) of a model.

    Args:
        model: The model.
        bits: Weight bits per targeted parameter name.
        folds: Conv module name -> BatchNorm module name, for BN folding.
        activations: Activation bits (8) or None for float activations.
        layouts: Per weight name, its layout where it is not (out, in, *kernel): scales are
            per output channel of the real layout (a transformers ``Conv1D``'s columns).
        quantize_output: Fake-quantize the output of the last quantized layer to run too.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: dict[str, int],
        folds: dict[str, str],
        activations: int | None,
        layouts: dict[str, WeightLayout] | None = None,
        quantize_output: bool = True,
    ) -> None:
        self.model = model
        self.bits = bits
        self.folds = folds
        self.layouts = {n: lay for n, lay in (layouts or {}).items() if not lay.standard}
        self.quantize_output = quantize_output
        # The last quantized layer to run in a training forward: its output stays float
        # unless `quantize_output`. Found on the first forward, kept in the checkpoint.
        self.output_layer: str | None = None
        self._ran: list[str] = []
        modules = dict(model.named_modules())
        self.by_module: dict[str, list[str]] = {}
        for name in bits:
            owner, leaf = split_name(name)
            self.by_module.setdefault(owner, []).append(leaf)
        self.modules = {m: modules[m] for m in self.by_module}
        self.bns = {conv: modules[bn] for conv, bn in folds.items()}
        self.observers = (
            {m: ActivationObserver(bits=activations) for m in self.by_module} if activations else {}
        )
        self.steps: dict[str, torch.Tensor] = {}  # learned step sizes (method "lsq"), by weight
        # Weight sharing (scheme "kmeans"), by weight: these compute with their codebooks.
        self.shared: dict[str, SharedWeight] = {}
        self.enabled = False  # weights (and outputs) fake-quantized
        self.observing = False  # observers take this batch's range
        self.batch_ranges: dict[str, torch.Tensor] = {}  # per layer: (-min, max) of the batch
        self._saved: dict[tuple[str, str], nn.Parameter] = {}
        self._handles: list[Any] = []
        self._attention = any(isinstance(m, nn.MultiheadAttention) for m in modules.values())
        self._fastpath: bool | None = None  # the process-wide flag as it was before install

    def install(self) -> None:
        """Puts the hooks on the targeted layers (again a no-op while they are on)."""
        if self._handles:
            return
        if self._attention:
            # The fused attention fast path reads the weights without calling the module, so
            # the hooks (and the quantization) would be skipped in eval: keep the reference path
            # while the hooks are on, and give the process its setting back when they come off.
            self._fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))

    def remove(self) -> None:
        """Takes the hooks off and puts back the parameters and the attention fast-path flag."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._restore_all()
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    @contextmanager
    def installed(self) -> Iterator[FakeQuantLayers]:
        """The model computes as it trains (fake-quantized) inside the block.

        Hooks that were already on stay on afterwards; hooks this installed come off.
        """
        was_installed = bool(self._handles)
        self.install()
        try:
            yield self
        finally:
            if not was_installed:
                self.remove()

    def layout(self, name: str) -> WeightLayout:
        return self.layouts.get(name, STANDARD)

    def folded_weight(
        self, module_name: str, leaf: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight as it is quantized, in (out, in, *kernel) order with BN folded in where
        paired, and the fold factor (shaped to broadcast over it)."""
        name = f"{module_name}.{leaf}" if module_name else leaf
        weight = self.layout(name).canonical(self.modules[module_name]._parameters[leaf])
        if module_name in self.bns and leaf == "weight":
            fold = channel_view(fold_scale(self.bns[module_name]), weight)
            return weight * fold, fold
        return weight, None

    def quantized_weight(self, module_name: str, leaf: str) -> torch.Tensor:
        """The fake-quantized value of a targeted weight, as the forward uses it."""
        name = f"{module_name}.{leaf}" if module_name else leaf
        weight, fold = self.folded_weight(module_name, leaf)
        shared = self.shared.get(name)
        if shared is not None:  # never folded: BN folding is refused for shared layers
            return self.layout(name).uncanonical(shared(weight))
        step = self.steps.get(name)
        if step is None:
            quantized = fake_quant_weight(weight, self.bits[name])
        else:
            quantized = lsq_fake_quant_weight(weight, self.bits[name], step)
        return self.layout(name).uncanonical(quantized if fold is None else quantized / fold)

    def quantizes_output(self, module_name: str) -> bool:
        """Whether the output of ``module_name`` is fake-quantized (and packed as int8).

        Until the output layer is known (before the first training batch, or a checkpoint
        written before it was recorded) every observed layer counts as quantized: that is how
        such a checkpoint was trained, and a fresh run's observers are still empty then.
        """
        if module_name not in self.observers:
            return False
        return self.quantize_output or self.output_layer != module_name

    @torch.no_grad()
    def convert(self) -> CompressionRecord:
        """The true integers of the targeted weights, as the fake-quantized forward uses them.

        Returns:
            One :class:`QuantizedLayer` per targeted weight (BatchNorm fold divided out of the
            scale, the owning layer's activation range where observed), or a
            :class:`~lightning_compress.quantization.SharedLayer` for a shared one, named in
            ``model``.
        """
        layers: list[LayerRecord] = []
        for name, bits in self.bits.items():
            owner, leaf = split_name(name)
            weight, fold = self.folded_weight(owner, leaf)
            observer = self.observers.get(owner) if self.quantizes_output(owner) else None
            activation = None if observer is None else ActivationRange.from_observer(observer)
            if name in self.shared:
                layers.append(self.shared[name].record(name, weight, activation))
                continue
            layers.append(
                QuantizedLayer.from_weight(
                    name, weight, bits, step=self.steps.get(name), fold=fold, activation=activation
                )
            )
        return CompressionRecord(layers, root=self.model)

    def _pre(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if not self.enabled:
                return
            if module is not self.modules[name]:
                # The hooks of a deep-copied model still read the original's weights.
                raise RuntimeError(
                    f"QATCallback: {name!r} belongs to a copy of a model whose quantization is "
                    "attached to the original; call `qat.remove(model)` before copying, or "
                    "`qat.attach(copy)` to quantize the copy"
                )
            for leaf in self.by_module[name]:
                self._saved[name, leaf] = module._parameters[leaf]
                module._parameters[leaf] = self.quantized_weight(name, leaf)

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for leaf in self.by_module[name]:
                saved = self._saved.pop((name, leaf), None)
                if saved is not None:
                    module._parameters[leaf] = saved
            observer = self.observers.get(name)
            if observer is None or not self.enabled:
                return None
            first = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(first) or not first.is_floating_point():
                return None
            if self.output_layer is None and module.training:
                self._ran.append(name)
            if self.observing and module.training:
                # (-min, max), folded into the observer at the end of the batch, after the
                # ranks agree on it.
                seen = torch.stack([-first.detach().amin(), first.detach().amax()]).float()
                if name in self.batch_ranges:
                    seen = torch.maximum(seen, self.batch_ranges[name])
                self.batch_ranges[name] = seen
            if not self.quantizes_output(name):
                return None
            quantized = observer.fake_quant(first)
            if isinstance(output, tuple):
                return (quantized, *output[1:])
            return quantized

        return hook

    def end_batch(self) -> None:
        """After a training batch: the last layer that ran is the output layer (once)."""
        if self.output_layer is None and self._ran:
            self.output_layer = self._ran[-1]
        self._ran.clear()

    def _restore_all(self) -> None:
        for (name, leaf), saved in self._saved.items():
            self.modules[name]._parameters[leaf] = saved
        self._saved.clear()
