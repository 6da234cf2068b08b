"""Weight sharing with trained k-means codebooks (Han, Mao, Dally 2016, "Deep Compression").

A shared layer keeps a small codebook per group of consecutive output channels and, per weight,
the index (uint8) of its centroid; weights that are exact zeros (pruned) are not clustered and
stay exactly zero. The forward computes with ``codebook[group, index]`` where the dense weight is
non-zero, and 0 where it is zero, so a weight a pruning callback zeroes later leaves the mask at
once, in either callback order.

Training follows Deep Compression: the gradient of a centroid is the sum of the gradients of the
weights assigned to it; the dense weight receives the same gradient straight through, so it keeps
training and a refresh (nearest centroid per weight) can move it to another cluster.

Memory: nothing per weight beyond the uint8 index is kept (no one-hot or soft assignment matrix,
DKM's memory problem). The forward and backward are fused compiled ops (ops/shared_weight.py), one
pass over the weight each, with no temporaries per weight; the backward masks the incoming
gradient in place. Clustering, refresh and index packing run over row chunks, so their
temporaries are bounded by the chunk, not by the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_compress import ops
from lightning_compress.ops.shared_weight import (
    shared_weight_backward_any,
    shared_weight_forward_any,
)
from lightning_compress.quantization.record import ActivationRange, SharedLayer

# Elements per chunk of the refresh and packing loops: a chunk's temporaries (int32 indices,
# the zero mask: 16 + 4 MiB) bound them whatever the layer's size. Smaller chunks cost more
# than they save: each op is a parallel region, and on a loaded 2-core machine every region
# waited ~10 ms for a preempted thread (2^18: 2.9 s forward on 4096x4096, 2^22: 0.30 s, the
# whole tensor at once: 0.29 s).
CHUNK = 1 << 22
KMEANS_ITERS = 50


def _row_chunks(rows: int, per_row: int, groups: int = 1) -> list[tuple[int, slice]]:
    """(group, rows) pairs of at most about ``CHUNK`` elements, never across two groups."""
    per_group = rows // groups
    step = max(1, min(per_group, CHUNK // max(per_row, 1)))
    return [
        (g, slice(r, min(r + step, (g + 1) * per_group)))
        for g in range(groups)
        for r in range(g * per_group, (g + 1) * per_group, step)
    ]


def kmeans_1d(values: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """1-D k-means (Lloyd) with linear initialisation over ``[min, max]`` (Deep Compression's
    best initialisation: it keeps centroids for the rare large weights).

    In 1-D each cluster is an interval of the sorted values, so the values are sorted once and
    an iteration is a binary search per centroid plus a sum per interval: exact Lloyd, with no
    per-value assignment tensor. Deterministic: same values, same centroids. A centroid that
    loses all its values stays where it is; the centroids stay sorted.

    Args:
        values: The weights to cluster (any shape, at least ``k`` of them).
        k: Number of centroids.
        iters: Most Lloyd iterations (it stops earlier at a fixed point).

    Returns:
        float32 [k] centroids, ascending.

    Raises:
        ValueError: Fewer values than centroids.
    """
    if values.numel() < k:
        raise ValueError(f"kmeans_1d: {k} centroids need at least {k} values, got {values.numel()}")
    ordered = _sorted(values.detach().reshape(-1).float())
    lo, hi = float(ordered[0]), float(ordered[-1])
    centroids = torch.linspace(lo, hi, k, dtype=torch.float64)
    for _ in range(iters):
        bounds = (centroids[1:] + centroids[:-1]) / 2
        # Values up to a bound (inclusive) go to the lower centroid, as `nearest` has it.
        ends = torch.searchsorted(ordered, bounds.to(ordered), right=True).tolist()
        edges = [0, *ends, ordered.numel()]
        updated = centroids.clone()
        for i in range(k):
            if edges[i + 1] > edges[i]:
                segment = ordered[edges[i] : edges[i + 1]]
                # torch's cascade summation keeps float32 accurate here (and 6x faster)
                updated[i] = float(segment.sum()) / segment.numel()
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.float().to(values.device)


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """Ascending copy of a 1-D tensor; on the CPU without torch.sort's int64 indices."""
    if values.device.type == "cpu":
        array = values.numpy().copy()
        array.sort()  # values only: equal values are interchangeable, any algorithm is exact
        return torch.from_numpy(array)
    return torch.sort(values).values


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each value's nearest centroid (``centroids`` in any order), int32.

    Ties go to the lower of the two sorted centroids, the same on every run.
    """
    ordered, order = torch.sort(centroids.detach().float(), stable=True)
    bounds = (ordered[1:] + ordered[:-1]) / 2
    position = torch.bucketize(values.detach().float(), bounds, right=False, out_int32=True)
    return order.to(torch.int32)[position]


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs uint8 indices in ``[0, 2**bits)`` at ``bits`` bits each, little-endian, into a flat
    uint8 tensor of ``ceil(n * bits / 8)`` bytes (the checkpoint's form of the assignments).

    Raises:
        ValueError: ``bits`` outside [1, 8] or indices that need more bits.
    """
    if not 1 <= bits <= 8 or indices.dtype != torch.uint8:
        raise ValueError(f"pack_indices: need uint8 indices and `bits` in [1, 8], got {bits}")
    flat = indices.detach().reshape(-1).cpu()
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"pack_indices: an index needs more than {bits} bits")
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    out = []
    per_chunk = CHUNK  # a multiple of 8, so each chunk's bits fill whole bytes
    for start in range(0, flat.numel(), per_chunk):
        chunk = flat[start : start + per_chunk]
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else flat.new_zeros(0)


def unpack_indices(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: uint8 indices of ``shape``.

    Raises:
        ValueError: ``packed`` is not the size ``shape`` needs at ``bits`` bits.
    """
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
        raise ValueError(
            f"unpack_indices: need {(n * bits + 7) // 8} uint8 bytes for {tuple(shape)} at "
            f"{bits} bits, got {packed.dtype} [{packed.numel()}]"
        )
    if bits == 8:
        return packed.reshape(shape).clone()
    shifts = torch.arange(8, dtype=torch.uint8)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32)
    out = []
    per_chunk = CHUNK * bits // 8  # bytes holding CHUNK indices
    for start in range(0, packed.numel(), per_chunk):
        stream = ((packed[start : start + per_chunk, None] >> shifts) & 1).reshape(-1)
        usable = stream.numel() // bits * bits
        values = (stream[:usable].view(-1, bits).to(torch.int32) * weights).sum(1)
        out.append(values.to(torch.uint8))
    return torch.cat(out)[:n].reshape(shape)


class _SharedWeight(torch.autograd.Function):
    """``codebook[group, index]`` where ``weight != 0``, else 0.

    Backward (Deep Compression): the weight gets the gradient straight through where it is not
    zero; each centroid gets the sum of the gradients of the weights assigned to it.

    float32 weights run the fused ops (one pass over the weight each way); other precisions run
    their pure-PyTorch form. Nothing is saved but the weight (a parameter autograd holds anyway)
    and the indices: the backward compares the weight with 0 again.
    """

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        w, books = weight.detach(), codebook.detach()
        if w.dtype == torch.float32 and books.dtype == torch.float32:
            out = ops.shared_weight_forward(w, indices, books)
        else:
            out = shared_weight_forward_any(w, indices, books)
        ctx.save_for_backward(weight, indices)
        ctx.groups, ctx.levels = codebook.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        weight, indices = ctx.saved_tensors
        # The incoming gradient (fresh from the layer's backward, used by nothing else) is
        # masked in place, so no second weight-sized buffer is held; an expanded or strided one
        # (``weight.sum().backward()``) is copied first.
        grad_weight = grad.contiguous()
        w = weight.detach()
        if grad_weight.dtype == torch.float32 and w.dtype == torch.float32:
            grad_codebook = ops.shared_weight_backward_(
                grad_weight, w, indices, ctx.groups, ctx.levels
            )
        else:
            grad_codebook = shared_weight_backward_any(
                grad_weight, w, indices, ctx.groups, ctx.levels
            )
        return grad_weight, grad_codebook, None


class SharedWeight:
    """One layer's codebooks (trained) and assignments (uint8, refreshed on a schedule).

    The weight it is applied to is in canonical layout (output channels on dim 0); groups are
    consecutive output channels. Build one with :meth:`cluster` or :meth:`from_state`.

    Args:
        codebook: float32 [groups, 2**bits], a leaf that requires grad.
        indices: uint8 of the weight's shape (0 where the weight is zero).
        bits: Index bits, 1 to 8.
    """

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, bits: int) -> None:
        self.codebook = codebook
        self.indices = indices
        self.bits = bits

    @property
    def groups(self) -> int:
        return int(self.codebook.shape[0])

    @classmethod
    @torch.no_grad()
    def cluster(
        cls, weight: torch.Tensor, bits: int, groups: int = 1, name: str = "weight"
    ) -> SharedWeight:
        """Clusters each group's non-zero weights into ``2**bits`` centroids (linear init).

        Args:
            weight: The layer's weight, output channels on dim 0.
            bits: Index bits, 1 to 8.
            groups: Codebooks per layer; must divide the output channels.
            name: The weight's name, for messages.

        Raises:
            ValueError: ``groups`` does not divide the output channels, or a group has fewer
                surviving (non-zero) weights than centroids.
        """
        check_groups(name, weight.shape, groups)
        levels = 2**bits
        rows = weight.shape[0]
        w = weight.detach().reshape(groups, -1)
        codebook = torch.zeros(groups, levels, dtype=torch.float32, device=weight.device)
        for g in range(groups):
            survivors = w[g][w[g] != 0]
            if survivors.numel() < levels:
                where = (
                    f"group {g} of {groups} (output channels {g * rows // groups} to "
                    f"{(g + 1) * rows // groups - 1})"
                    if groups > 1
                    else "the layer"
                )
                raise ValueError(
                    f"{name}: {levels} centroids ({bits} bits) need at least {levels} non-zero "
                    f"weights in {where}, got {survivors.numel()}; lower `bits` or `groups`"
                )
            codebook[g] = kmeans_1d(survivors, levels)
            del survivors
        indices = torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device)
        shared = cls(codebook.requires_grad_(True), indices, bits)
        shared.refresh(weight)
        return shared

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the forward computes with: each non-zero weight's centroid."""
        return _SharedWeight.apply(weight.contiguous(), self.codebook, self.indices)

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The weights that take part: those that are not exact zeros."""
        return weight.detach() != 0

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> float:
        """Re-assigns each non-zero weight to its nearest centroid (of its group).

        Returns:
            The fraction of the non-zero weights whose centroid changed.
        """
        rows = weight.shape[0]
        w = weight.detach().reshape(rows, -1)
        indices = self.indices.view(rows, -1)
        changed = alive = 0
        for g, chunk in _row_chunks(rows, w.shape[1], self.groups):
            zero = w[chunk] == 0
            fresh = nearest(w[chunk], self.codebook[g]).to(torch.uint8).masked_fill_(zero, 0)
            changed += int(((fresh != indices[chunk]) & ~zero).sum())
            alive += zero.numel() - int(zero.sum())
            indices[chunk] = fresh
        return changed / max(alive, 1)

    def record(
        self, name: str, weight: torch.Tensor, activation: ActivationRange | None = None
    ) -> SharedLayer:
        """The export record: codebook, indices (0 at zeros), mask, on the CPU."""
        mask = self.mask(weight).cpu()
        indices = self.indices.detach().cpu().masked_fill(~mask, 0)
        codebook = self.codebook.detach().float().cpu().clone()
        return SharedLayer(name, codebook, indices, mask, self.bits, activation)

    def state_dict(self) -> dict[str, Any]:
        """Codebook and assignments packed at ``bits`` per index (tensors and ints only)."""
        return {
            "codebook": self.codebook.detach().cpu().clone(),
            "indices": pack_indices(self.indices, self.bits),
            "bits": self.bits,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], shape: tuple[int, ...], device: torch.device | str = "cpu"
    ) -> SharedWeight:
        """Rebuilds a layer's codebook and assignments from :meth:`state_dict`."""
        bits = int(state["bits"])
        indices = unpack_indices(state["indices"], bits, tuple(shape)).to(device)
        codebook = state["codebook"].float().to(device).clone().requires_grad_(True)
        return cls(codebook, indices, bits)


def check_groups(name: str, shape: tuple[int, ...] | torch.Size, groups: int) -> None:
    """Raises unless ``groups`` divides the output channels (dim 0 of ``shape``)."""
    if shape[0] % groups:
        raise ValueError(
            f"`groups`={groups} must divide the output channels of {name} ({shape[0]})"
        )
