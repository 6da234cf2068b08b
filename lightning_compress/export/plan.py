"""Which layers of a model pack, and why each of the others stays fp32.

Every weight-bearing layer is either replaced by a packed module or listed with the reason it is
not (the artifact stores the list, ``report`` prints it): nothing is left out silently.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from lightning_compress.export.modules import unpackable_reason
from lightning_compress.layout import layouts_of


@dataclass(frozen=True)
class UnpackedLayer:
    """A weight-bearing layer that stays fp32, and why (a row of ``report``).

    Args:
        name: The module's qualified name.
        type: Its class name.
        reason: Why it is not packed, ending in what happens to it (``"...: kept fp32"``).
    """

    name: str
    type: str
    reason: str


@dataclass
class LayerPlan:
    """The weight-bearing layers of a model: those packing may replace and the others.

    Args:
        packable: Module name -> module, for the layers with a packed replacement.
        unpacked: Module name -> why the layer stays fp32, for all the others.
        order: Every weight-bearing layer's name, in model order.
    """

    packable: dict[str, nn.Module]
    unpacked: dict[str, UnpackedLayer]
    order: list[str]


def _weight_leaves(module: nn.Module) -> list[str]:
    """The module's own weights: registered ones (:mod:`lightning_compress.layout`), and any
    other parameter named ``weight`` or ``*_weight`` with at least 2 dims (an embedding)."""
    leaves = list(layouts_of(module))
    for leaf, param in module.named_parameters(recurse=False):
        named = leaf == "weight" or leaf.endswith("_weight")
        if named and param.dim() >= 2 and leaf not in leaves:
            leaves.append(leaf)
    return leaves


def plan_layers(model: nn.Module, exclude: list[str] | None = None) -> LayerPlan:
    """Sorts every weight-bearing layer of ``model`` into packable and kept fp32, with reasons.

    Weight-bearing: a module with a registered weight (:mod:`lightning_compress.layout`) or a
    parameter named ``weight`` or ``*_weight`` of at least 2 dims. Kept fp32, in this order of
    precedence: the model itself (only submodules can be swapped), names matching an
    ``exclude`` pattern, nn.MultiheadAttention and the layers inside it (its forward reads
    their weights without calling them), the feed-forward layers of an nn.TransformerEncoderLayer
    (whose fused inference path does the same), layers without a packed kernel
    (:func:`~lightning_compress.export.modules.unpackable_reason`: grouped convolutions,
    Conv1d, embeddings, ...) and layers whose weight is tied to another parameter.

    Args:
        model: The model to pack.
        exclude: Module-name glob patterns to keep fp32.

    Returns:
        The plan: every weight-bearing layer is in exactly one of ``packable`` and ``unpacked``.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    attention: dict[str, str] = {}
    for name, module in modules:
        if isinstance(module, nn.MultiheadAttention):
            attention[name] = "nn.MultiheadAttention"
            for child, _ in module.named_modules(remove_duplicate=False):
                if child:
                    attention[f"{name}.{child}" if name else child] = "inside nn.MultiheadAttention"
        elif isinstance(module, nn.TransformerEncoderLayer):
            # Its fused inference path (eval, no grad) passes linear1/linear2's weights to one op.
            for child in ("linear1", "linear2"):
                attention[f"{name}.{child}" if name else child] = (
                    "inside nn.TransformerEncoderLayer"
                )
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    plan = LayerPlan({}, {}, [])
    for name, module in modules:
        leaves = _weight_leaves(module)
        if not leaves:
            continue
        own = {f"{name}.{leaf}" if name else leaf for leaf in leaves}
        partners = [
            alias
            for leaf in leaves
            for alias in aliases.get(id(getattr(module, leaf)), [])
            if alias not in own
        ]
        reason = _why_kept(name, module, exclude or [], attention.get(name), partners)
        plan.order.append(name)
        if reason is None:
            plan.packable[name] = module
        else:
            plan.unpacked[name] = UnpackedLayer(name, type(module).__name__, f"{reason}: kept fp32")
    return plan


def _why_kept(
    name: str, module: nn.Module, exclude: list[str], attention: str | None, partners: list[str]
) -> str | None:
    """Why the layer ``name`` stays fp32, in :func:`plan_layers`' order; None when it packs."""
    pattern = next((p for p in exclude if fnmatch.fnmatchcase(name, p)), None)
    if not name:
        return "the model itself (only its submodules can be swapped)"
    if pattern is not None:
        return f"excluded by pattern {pattern!r}"
    if attention is not None:
        return f"{attention} (its forward reads the weights directly)"
    reason = unpackable_reason(module)
    if reason is None and partners:
        return f"weight tied to {partners[0].rpartition('.')[0] or partners[0]}"
    return reason


def packable_layers(model: nn.Module, exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """The layers packing may replace, by module name (see :func:`plan_layers`)."""
    return plan_layers(model, exclude).packable
