"""Low-rank linear algebra on a weight's canonical matrix, without a Trainer.

A weight is seen as its ``(out, in * kernel)`` matrix (:meth:`WeightLayout.matrix`), so a Linear,
a Conv2d (whose rank-r form is a convolution with r filters followed by a 1x1 convolution),
transformers' ``Conv1D`` and an attention in-projection are one case.

Two operations keep a weight at rank r:

- at an event, :func:`truncate` (an SVD, the best rank-r approximation in Frobenius norm, Eckart
  and Young) sets the rank and returns the right basis V;
- after every optimizer step, :func:`retract` brings the updated matrix back to rank r with one
  step of subspace iteration from the previous basis: ``Q = orth(M V)``, ``M <- Q (Q^T M)``,
  ``V <- orth((Q^T M)^T)``. The result has rank <= r exactly (it is a product through r
  columns), costs three thin products (3 m n r flops) instead of an SVD, and, since a step moves
  the weight little, is the truncation of the updated matrix to within the step's second order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress.layout import layout_for_name
from lightning_compress.lowrank.record import LowRankLayer
from lightning_compress.quantization.record import CompressionRecord


def full_rank(shape: tuple[int, ...]) -> int:
    """The full rank of a weight of canonical ``shape`` ``(out, in, *kernel)``."""
    reduction = 1
    for d in shape[1:]:
        reduction *= d
    return min(shape[0], reduction)


def kept_energy(singular: torch.Tensor, rank: int, total: float | None = None) -> float:
    """The share of the squared Frobenius norm the ``rank`` largest singular values hold.

    Args:
        singular: Singular values, descending (the largest ones at least).
        rank: How many are kept.
        total: The squared Frobenius norm, when ``singular`` holds only the largest values (a
            randomized SVD); by default the sum of their squares.
    """
    squares = singular.double() ** 2
    total = float(squares.sum()) if total is None else total
    return 1.0 if total == 0.0 else float(squares[:rank].sum()) / total


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values hold ``energy`` of the squared norm (>= 1)."""
    squares = singular.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    # A tolerance, so that energy=1.0 keeps the exact rank and not every rounding residue.
    return max(1, int(torch.searchsorted(cumulative, energy - 1e-12)) + 1)


@dataclass(frozen=True)
class Truncation:
    """A matrix's best rank-``rank`` approximation ``first @ second`` and its spectrum.

    Attributes:
        first: ``(out, rank)``, U_r sqrt(S_r).
        second: ``(rank, reduction)``, sqrt(S_r) V_r^T: both factors carry the same scale,
            which keeps their per-channel quantization balanced.
        basis: ``(reduction, rank)``, V_r, orthonormal columns (what :func:`retract` starts from).
        singular: Every singular value of the matrix, descending.
    """

    first: torch.Tensor
    second: torch.Tensor
    basis: torch.Tensor
    singular: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.first.shape[1])


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``(U, S, Vh)`` of ``matrix``, in float32."""
    return torch.linalg.svd(matrix.detach().float(), full_matrices=False)


def truncate(
    matrix: torch.Tensor,
    rank: int,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Truncation:
    """The best rank-``rank`` approximation of ``matrix`` (``(out, reduction)``).

    Args:
        matrix: The weight's canonical matrix.
        rank: 1 to its full rank.
        factors: Its SVD ``(U, S, Vh)`` when already computed.
    """
    u, s, vh = factors if factors is not None else svd(matrix)
    root = s[:rank].sqrt()
    return Truncation(
        first=(u[:, :rank] * root).to(matrix.dtype),
        second=(root[:, None] * vh[:rank]).to(matrix.dtype),
        basis=vh[:rank].T.contiguous().to(matrix.dtype),
        singular=s,
    )


def randomized_truncate(
    matrix: torch.Tensor, rank: int, seed: int, oversample: int = 10, iterations: int = 2
) -> Truncation:
    """A near-best rank-``rank`` approximation by a seeded randomized SVD (Halko et al. 2011).

    ``rank + oversample`` Gaussian probes, ``iterations`` power iterations (re-orthonormalised),
    then an exact SVD of the small projected matrix: 2 (iterations + 1) products with the
    matrix instead of a full SVD, which for a 4096 x 4096 weight at rank 341 is a second
    instead of a minute. ``singular`` holds only the ``rank + oversample`` largest values.

    Args:
        matrix: The weight's canonical matrix ``(out, reduction)``.
        rank: The rank kept.
        seed: Seeds the probes (the same on every call with the same seed: no global RNG).
        oversample: Extra probes beyond ``rank``.
        iterations: Power iterations (sharpen a slowly decaying spectrum).
    """
    work = matrix.detach().float()
    probes = min(rank + oversample, min(work.shape))
    generator = torch.Generator(device=work.device).manual_seed(seed)
    omega = torch.randn(work.shape[1], probes, generator=generator, device=work.device)
    q = orthonormal(work @ omega)
    for _ in range(iterations):
        q = orthonormal(work @ orthonormal(work.T @ q))
    u_small, s, vh = torch.linalg.svd(q.T @ work, full_matrices=False)
    return truncate(matrix, rank, (q @ u_small, s, vh))


def orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``columns``' span, as many columns (reduced QR)."""
    q, _ = torch.linalg.qr(columns)
    return q


@torch.no_grad()
def retract(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Brings ``matrix`` back to rank ``basis.shape[1]`` in place; returns the new basis.

    One step of subspace iteration from the previous right basis (see the module docstring).

    Args:
        matrix: ``(out, reduction)``, a view of the weight (written in place).
        basis: ``(reduction, rank)`` with orthonormal columns.
    """
    q = orthonormal(matrix @ basis)
    coefficients = q.T @ matrix  # (rank, reduction)
    matrix.copy_(q @ coefficients)
    return orthonormal(coefficients.T)


def lowrank_record(
    model: nn.Module,
    ranks: Mapping[str, int],
    bits: int | None = None,
) -> CompressionRecord:
    """The export record of ``model``'s weights at the given ranks (an SVD of each).

    Args:
        model: The model, named as in ``ranks``.
        ranks: Weight name -> rank (the weight is truncated to it in the record, not in the
            model).
        bits: Quantize each factor per channel to 8 or 4 bits when packed, or keep them fp32.
    """
    layers = []
    for name, rank in ranks.items():
        weight = model.get_parameter(name).detach().cpu().float()
        matrix = layout_for_name(model, name).matrix(weight)
        cut = truncate(matrix, rank)
        layers.append(
            LowRankLayer(name, cut.first.contiguous(), cut.second.contiguous(), bits=bits)
        )
    return CompressionRecord(layers, root=model)
