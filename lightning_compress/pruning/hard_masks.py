"""Hard masks on real parameters: pruned entries are zeros in ``weight`` itself.

Nothing is reparametrised (no ``weight_orig``/``weight_mask``), so state_dict keys never change.
Zeros are kept three ways, each cheap: gradients of pruned entries are zeroed before the optimizer
step, optimizer state (momentum, Adam moments) of pruned entries is zeroed when a mask changes,
and the mask is re-applied after every optimizer step, which also covers optimizers that move
weights without a gradient (decoupled weight decay, custom update rules).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lightning_compress.ops import pack_bits, unpack_bits


class HardMasks:
    """Boolean keep-masks for named parameters of one model.

    Args:
        params: The parameters masks may be set for, by qualified name.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        # Stored inverted (True = pruned) so that enforcing is one masked_fill_ per tensor.
        self._pruned: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._pruned

    def __len__(self) -> int:
        return len(self._pruned)

    def keep_mask(self, name: str) -> torch.Tensor:
        """The keep-mask (True = kept) of a parameter; all True if none was set."""
        if name in self._pruned:
            return ~self._pruned[name]
        return torch.ones_like(self.params[name], dtype=torch.bool)

    def keep_masks(self) -> dict[str, torch.Tensor]:
        return {name: ~pruned for name, pruned in self._pruned.items()}

    @torch.no_grad()
    def set(self, masks: dict[str, torch.Tensor]) -> None:
        """Sets keep-masks and zeros the pruned weights at once.

        Raises:
            ValueError: A mask for an unknown parameter or of the wrong shape.
        """
        for name, keep in masks.items():
            if name not in self.params:
                raise ValueError(f"mask for {name!r}, which is not a targeted parameter")
            param = self.params[name]
            if tuple(keep.shape) != tuple(param.shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(keep.shape)}, the parameter has "
                    f"{tuple(param.shape)}"
                )
            pruned = ~keep.to(device=param.device, dtype=torch.bool)
            self._pruned[name] = pruned
            param.masked_fill_(pruned, 0)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for name, pruned in self._pruned.items():
            self.params[name].masked_fill_(pruned, 0)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        for name, pruned in self._pruned.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.masked_fill_(pruned, 0)

    @torch.no_grad()
    def apply_to_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zeros every per-element state tensor (momentum, moments) of pruned entries."""
        for optimizer in optimizers:
            for name, pruned in self._pruned.items():
                state = optimizer.state.get(self.params[name])
                for value in (state or {}).values():
                    if torch.is_tensor(value) and value.shape == pruned.shape:
                        value.masked_fill_(pruned, 0)

    def state_dict(self) -> dict[str, dict]:
        """Masks packed eight to a byte, plus their shapes: tensors and primitives only."""
        return {
            "packed": {n: pack_bits((~p).cpu()) for n, p in self._pruned.items()},
            "shapes": {n: list(p.shape) for n, p in self._pruned.items()},
        }

    @staticmethod
    def unpack_state(state: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Keep-masks from :meth:`state_dict` output."""
        return {
            name: unpack_bits(packed, math.prod(state["shapes"][name])).view(state["shapes"][name])
            for name, packed in state["packed"].items()
        }
