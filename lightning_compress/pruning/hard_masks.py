"""Hard masks on real parameters: pruned entries are zeros in ``weight`` itself.

Nothing is reparametrised (no ``weight_orig``/``weight_mask``), so state_dict keys never change.
Gradients of pruned entries are zeroed before the optimizer step and their optimizer state
(momentum, Adam moments) when a mask changes. For torch's built-in optimizers a zero gradient with
zero state is a zero update (weight decay of a zero weight is zero too), so that alone keeps the
zeros exact; for any other optimizer, or a step whose gradients were not masked, the masks are
re-applied to the weights after the step. Masks are held as 0/1 tensors in the parameter's dtype:
enforcing one is a single vectorised multiply per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lightning_compress.ops import pack_bits, unpack_bits

# Optimizers whose update of an entry with zero gradient and zero state is exactly zero,
# weight decay (coupled or decoupled) included.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


class HardMasks:
    """Boolean keep-masks for named parameters of one model.

    Args:
        params: The parameters masks may be set for, by qualified name.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self._scale: dict[str, torch.Tensor] = {}  # 1 = kept, 0 = pruned, in the param's dtype

    def __len__(self) -> int:
        """How many masks are set: no mask yet (falsy) means nothing to enforce."""
        return len(self._scale)

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """The masks as 0/1 tensors in each parameter's dtype (read-only use)."""
        return self._scale

    def keep_mask(self, name: str) -> torch.Tensor:
        """The keep-mask (True = kept) of a parameter; all True if none was set."""
        if name in self._scale:
            return self._scale[name] != 0
        return torch.ones_like(self.params[name], dtype=torch.bool)

    def keep_masks(self) -> dict[str, torch.Tensor]:
        return {name: scale != 0 for name, scale in self._scale.items()}

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
            scale = keep.to(device=param.device, dtype=param.dtype)
            self._scale[name] = scale
            param.mul_(scale)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for name, scale in self._scale.items():
            self.params[name].mul_(scale)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        for name, scale in self._scale.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.mul_(scale)

    @torch.no_grad()
    def apply_to_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zeros every per-element state tensor (momentum, moments) of pruned entries."""
        for optimizer in optimizers:
            for name, scale in self._scale.items():
                state = optimizer.state.get(self.params[name])
                for value in (state or {}).values():
                    if torch.is_tensor(value) and value.shape == scale.shape:
                        value.mul_(scale.to(value.dtype))

    def state_dict(self) -> dict[str, dict]:
        """Masks packed eight to a byte, plus their shapes: tensors and primitives only."""
        masks = self.keep_masks()
        return {
            "packed": {n: pack_bits(m.cpu()) for n, m in masks.items()},
            "shapes": {n: list(m.shape) for n, m in masks.items()},
        }

    @staticmethod
    def unpack_state(state: dict[str, dict]) -> dict[str, torch.Tensor]:
        """Keep-masks from :meth:`state_dict` output."""
        return {
            name: unpack_bits(packed, math.prod(state["shapes"][name])).view(state["shapes"][name])
            for name, packed in state["packed"].items()
        }
