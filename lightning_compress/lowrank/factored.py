"""Training a layer through its two factors: the ``method="factored"`` side of low rank.

A factored layer's forward computes ``x -> second -> first`` (two thin products, r (m + n)
multiply-adds per input instead of m n), the optimizer trains the factors in place of the
weight (they take the weight's slot in its parameter group, so learning-rate schedules, weight
decay and gradient clipping treat them as they treated it), and after every step the weight is
written back as ``first @ second``: it stays the real, rank-r weight of the state dict.

Supported: ``nn.Linear``, transformers' ``Conv1D`` (canonical ``(out, in)`` = a Linear), and
``nn.Conv2d`` with ``groups=1`` and zero padding (a convolution with r filters, then a 1x1).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.layout import WeightLayout


def factoring_refusal(module: nn.Module, leaf: str) -> str | None:
    """Why ``module``'s ``leaf`` cannot be trained factored, or None when it can."""
    if leaf != "weight":
        return f"its {leaf!r} is used by the module's own code, not through a weight product"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped Conv2d (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"a Conv2d with padding_mode={module.padding_mode!r}"
        return None
    if type(module) is nn.Linear or type(module).__qualname__ == "Conv1D":
        return None
    return f"a {type(module).__name__}, whose forward does not go through one weight product"


class FactoredLayer:
    """One layer trained through its factors.

    Args:
        module: The layer (see :func:`factoring_refusal`).
        layout: Its weight's layout.
        first: ``(out, rank)``.
        second: ``(rank, reduction)``.
    """

    def __init__(
        self, module: nn.Module, layout: WeightLayout, first: torch.Tensor, second: torch.Tensor
    ) -> None:
        self.module = module
        self.layout = layout
        self.weight: nn.Parameter = module.weight
        self.first = nn.Parameter(first.detach().clone().to(self.weight))
        self.second = nn.Parameter(second.detach().clone().to(self.weight))
        self._installed = False

    @property
    def rank(self) -> int:
        return int(self.first.shape[1])

    def install(self) -> None:
        """Routes the module's forward through the factors."""
        if not self._installed:
            self.module.forward = types.MethodType(_forward_of(self.module, self), self.module)
            self._installed = True

    def remove(self) -> None:
        """Gives the module its own forward back (it computes the written-back weight)."""
        if self._installed:
            del self.module.forward
            self._installed = False

    @torch.no_grad()
    def write_back(self) -> None:
        """Sets the real weight to ``first @ second``."""
        matrix = self.first @ self.second
        self.weight.copy_(self.layout.from_matrix(matrix, self.weight.shape))

    @torch.no_grad()
    def set_factors(self, first: torch.Tensor, second: torch.Tensor) -> None:
        """Replaces the factors (a lower rank at an event); their optimizer state must go."""
        self.first.data = first.detach().clone().to(self.weight)
        self.second.data = second.detach().clone().to(self.weight)
        self.write_back()

    def swap_into(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Puts the factors in the weight's slot of whichever optimizer trains it.

        Raises:
            ValueError: No optimizer holds the weight (it would never be trained).
        """
        found = False
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                params = group["params"]
                index = next((i for i, p in enumerate(params) if p is self.weight), None)
                if index is not None:
                    params[index : index + 1] = [self.first, self.second]
                    optimizer.state.pop(self.weight, None)
                    found = True
        if not found and not self._swapped(optimizers):
            raise ValueError(
                "LowRankCallback: method='factored' found no optimizer parameter group holding "
                f"the {type(self.module).__name__} weight of shape {tuple(self.weight.shape)}; "
                "the factors would never be trained"
            )
        self.weight.requires_grad_(False)

    def _swapped(self, optimizers: Iterable[torch.optim.Optimizer]) -> bool:
        return any(p is self.first for o in optimizers for g in o.param_groups for p in g["params"])

    def reset_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Drops the factors' optimizer state (their shapes changed)."""
        for optimizer in optimizers:
            optimizer.state.pop(self.first, None)
            optimizer.state.pop(self.second, None)


def _forward_of(module: nn.Module, layer: FactoredLayer) -> Any:
    if isinstance(module, nn.Conv2d):
        out_channels, in_channels = module.out_channels, module.in_channels
        kh, kw = module.kernel_size

        def conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            rank = layer.rank
            inner = F.conv2d(
                x,
                layer.second.view(rank, in_channels, kh, kw),
                None,
                self.stride,
                self.padding,
                self.dilation,
            )
            return F.conv2d(inner, layer.first.view(out_channels, rank, 1, 1), self.bias)

        return conv_forward

    def linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, layer.second), layer.first, self.bias)

    return linear_forward
