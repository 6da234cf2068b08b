"""FlipOut (Apostol, Stol & Forre 2020): score weights by how often their sign flips.

A weight that keeps flipping sign is oscillating around zero and is a good candidate for
removal: the score is ``|w|^p / (flips + 1)``. Flips are counted per weight across optimizer
steps; during training each layer's gradient gets Gaussian noise scaled to the layer,
``g += lambda * ||g||_2 / sqrt(n) * N(0, I)``, which makes weights near zero flip more. The
noise is read from a seeded table at offsets derived from (seed, step, layer), so every rank
and every resume adds the same noise.

Trainer-free: :class:`FlipCounter` works on named parameters; ``PruneCallback`` calls it from
its hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.ops import flip_count_, masked_noise_
from lightning_compress.pruning.criteria import CriterionContext, register_criterion


@register_criterion("flipout")
def flipout(weight: torch.Tensor, ctx: CriterionContext) -> torch.Tensor:
    """``|w|^p / (flips + 1)``; ``ctx.state`` holds ``flips`` and ``p`` (2 by default)."""
    if "flips" not in ctx.state:
        raise ValueError(
            f"criterion 'flipout' needs flip counts for {ctx.name!r}; it is used through "
            "PruneCallback(criterion='flipout'), which counts them"
        )
    p = float(ctx.state.get("p", 2.0))
    flips = ctx.state["flips"].to(device=weight.device, dtype=torch.float32)
    return weight.detach().float().abs().pow(p) / (flips + 1.0)


class FlipCounter:
    """Counts sign flips of named parameters across optimizer steps and adds gradient noise.

    Signs are remembered as int8 and updated after every step by the compiled ``flip_count_``
    op (one pass per tensor); :meth:`sync` re-reads them when weights change outside a step
    (pruning, rewinding). Noise comes from a table of Gaussian numbers drawn once from ``seed``:
    each step reads each layer's noise at an offset derived from (seed, step, layer), the
    shared-noise-table technique of evolution strategies. Every element is N(0, 1); a step costs
    one fused multiply-add per tensor instead of a fresh draw.

    Args:
        params: Parameters to track, by qualified name.
        noise: lambda, the noise scale relative to the layer's gradient norm (0 disables it).
        seed: Seed of the noise table and offsets: every rank and resumed run adds the same noise.
    """

    TABLE_SLACK = 1 << 20  # offsets per layer to choose from, beyond the largest layer

    def __init__(self, params: dict[str, nn.Parameter], noise: float = 1.0, seed: int = 0) -> None:
        self.params = params
        self.noise = noise
        self.seed = seed
        self.flips = {
            n: torch.zeros(p.shape, dtype=torch.int32, device=p.device) for n, p in params.items()
        }
        self._signs: dict[str, torch.Tensor] = {}
        self._tables: dict[torch.device, torch.Tensor] = {}
        self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Takes the current signs as the reference for the next step's flips."""
        for name, param in self.params.items():
            self._signs[name] = torch.sign(param.detach()).to(torch.int8).contiguous()

    @torch.no_grad()
    def after_step(self) -> None:
        """Adds one to every weight whose sign strictly changed in the step (zeros never flip)."""
        for name, param in self.params.items():
            flip_count_(param.detach(), self._signs[name], self.flips[name])

    @torch.no_grad()
    def add_noise(self, step: int, keep: dict[str, torch.Tensor] | None = None) -> None:
        """Masks each gradient, then ``g += noise * ||g||_2 / sqrt(n) * N(0, I) * keep``.

        One fused compiled pass per tensor (``masked_noise_``). With ``noise`` 0 the gradients
        are only masked.

        Args:
            step: Optimizer step; picks the noise, so ranks and resumed runs agree.
            keep: Keep-masks as 0/1 tensors in the gradient's dtype, by name; pruned entries
                get neither gradient nor noise.
        """
        keep = keep or {}
        for index, (name, param) in enumerate(self.params.items()):
            grad = param.grad
            if grad is None:
                continue
            mask = keep.get(name)
            if self.noise == 0:
                if mask is not None:
                    grad.mul_(mask)
                continue
            work = grad if grad.is_contiguous() else grad.contiguous()
            masked_noise_(work, mask, self._noise(work, step, index), self.noise)
            if work is not grad:
                grad.copy_(work)

    def _noise(self, grad: torch.Tensor, step: int, index: int) -> torch.Tensor:
        table = self._tables.get(grad.device)
        if table is None:
            size = max(p.numel() for p in self.params.values()) + self.TABLE_SLACK
            generator = torch.Generator().manual_seed(self.seed)
            table = torch.randn(size, generator=generator).to(grad.device)
            self._tables[grad.device] = table
        offset = _mix(self.seed, step, index) % (table.numel() - grad.numel() + 1)
        return table[offset : offset + grad.numel()].view(grad.shape).to(grad.dtype)

    @torch.no_grad()
    def reset(self, keep: dict[str, torch.Tensor]) -> None:
        """Zeros the counts of pruned weights (``keep`` False)."""
        for name, mask in keep.items():
            if name in self.flips:
                self.flips[name].mul_(mask.to(self.flips[name].device, torch.int32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: f.cpu().clone() for n, f in self.flips.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores counts saved by :meth:`state_dict`.

        Raises:
            ValueError: Counts for an untracked parameter or of the wrong shape.
        """
        for name, flips in state.items():
            if name not in self.flips:
                raise ValueError(
                    f"the checkpoint holds flip counts for {name!r}, which is not tracked "
                    f"(tracked: {sorted(self.flips)})"
                )
            if tuple(flips.shape) != tuple(self.flips[name].shape):
                raise ValueError(
                    f"flip counts for {name!r} have shape {tuple(flips.shape)}, the parameter "
                    f"has {tuple(self.flips[name].shape)}"
                )
            self.flips[name].copy_(flips)


def _mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): the same in every process."""
    x = 0
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x
