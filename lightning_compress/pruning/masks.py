"""Scores and target sparsities to hard keep-masks (True = kept).

Pruning is monotone: a weight the current mask pruned stays pruned (it ranks below everything).
Counts are exact: a target t over n weights zeros exactly round(t * n) of them, and ties are
broken by position, so every rank and every resume computes identical masks.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Sequence

import torch

_NM = re.compile(r"^\s*([0-9]+)\s*:\s*([0-9]+)\s*$")
_NM_FORMS = "'unstructured', 'channel' or 'N:M' with integers 1 <= N < M, like '2:4'"


def parse_nm(structure: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): at most N non-zeros in every group of M; None for other structures.

    Args:
        structure: ``"unstructured"``, ``"channel"`` or ``"N:M"``.

    Raises:
        ValueError: Any other value, or an N:M string with N < 1 or N >= M.
    """
    if structure in ("unstructured", "channel"):
        return None
    match = _NM.match(structure) if isinstance(structure, str) else None
    if match is None or not 1 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"`structure` must be {_NM_FORMS}, got {structure!r}")
    return int(match.group(1)), int(match.group(2))


def sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned entries (False) in a keep-mask.

    Args:
        mask: A keep-mask (True = kept).
    """
    return 1.0 - int(torch.count_nonzero(mask)) / mask.numel()


def count_zeros(masks: dict[str, torch.Tensor]) -> int:
    """Number of pruned entries (False) over all keep-masks.

    Args:
        masks: Keep-masks (True = kept) by name.
    """
    return sum(m.numel() - int(torch.count_nonzero(m)) for m in masks.values())


_BINS = 4096


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a flat float tensor, exactly.

    A histogram locates the bin holding the k-th value; the exact selection then runs on that
    bin's few candidates only: a few linear passes instead of a full selection, several times
    faster on tensors of millions of entries.
    """
    if flat.numel() < 4 * _BINS:
        return flat.kthvalue(k).values
    lo, hi = torch.aminmax(flat)
    if lo == hi:
        return lo
    if not (torch.isfinite(lo) and torch.isfinite(hi)):  # histc needs a finite range
        return flat.kthvalue(k).values
    counts = torch.histc(flat, bins=_BINS, min=float(lo), max=float(hi))
    b = int(torch.searchsorted(torch.cumsum(counts, 0), float(k)))
    width = (hi - lo) / _BINS
    # Widen by a bin on each side: histc's bin edges round differently from a comparison.
    a = lo + width * max(b - 1, 0)
    c = lo + width * (b + 2)
    below = int(torch.count_nonzero(flat < a))
    candidates = flat[(flat >= a) & (flat <= c)] if b + 2 < _BINS else flat[flat >= a]
    if not below < k <= below + candidates.numel():
        return flat.kthvalue(k).values
    return candidates.kthvalue(k - below).values


def _rankable(scores: torch.Tensor) -> torch.Tensor:
    """Scores to rank: float64 as given, anything else as float32.

    Half precision converts exactly, and not every selection kernel supports it.
    """
    scores = scores.detach()
    return scores if scores.dtype == torch.float64 else scores.float()


def _group_target(group: list[str], targets: dict[str, float]) -> float:
    """The one target of a global group.

    Raises:
        ValueError: The group's members have different targets.
    """
    given = {name: targets[name] for name in group}
    if len(set(given.values())) != 1:
        raise ValueError(f"`targets` of a global group must be equal, got {given}")
    return given[group[0]]


def _ranked_prune(scores: torch.Tensor, current: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Keep-mask (flat) with exactly ``max(n_zero, already pruned)`` zeros.

    Already-pruned entries stay pruned; the rest of the budget goes to the lowest-scoring
    survivors. Equal scores at the threshold are pruned in index order, so the count is exact and
    every rank computes the same mask.
    """
    flat = _rankable(scores).reshape(-1)
    alive = current.reshape(-1)
    n = flat.numel()
    survivors = int(torch.count_nonzero(alive))
    extra = n_zero - (n - survivors)  # survivors still to prune
    if extra <= 0:
        return alive.clone()
    if extra >= survivors:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    values = flat if survivors == n else flat[alive]
    threshold = kth_smallest(values, extra)
    keep = flat > threshold
    if survivors < n:
        keep &= alive
    excess = (n - int(torch.count_nonzero(keep))) - max(n_zero, n - survivors)
    if excess > 0:  # ties at the threshold: keep the last ones, prune the first
        ties = ((flat == threshold) & alive).nonzero().squeeze(1)
        keep[ties[ties.numel() - excess :]] = True
    return keep


def floor_count(size: int, min_density: float) -> int:
    """The fewest units (weights or channels) of ``size`` that keep ``min_density`` of them.

    Args:
        size: The layer's number of weights (or of output channels).
        min_density: Fraction of them a layer of a global group keeps at least.
    """
    # Rounded first so that a product like 0.01 * 235200 = 2352.0000000000005 is not one more.
    return math.ceil(round(min_density * size, 9))


def _floored_group(
    group: list[str],
    floors: dict[str, int],
    kept: int,
    prune_pool: Callable[[list[str], int], dict[str, torch.Tensor]],
    prune_to_floor: Callable[[str, int], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A global group's masks in which no layer keeps fewer weights than its floor.

    The group shares one threshold (``prune_pool(names, kept)``: masks of ``names`` keeping
    ``kept`` weights among them); every layer that threshold takes under its floor is held at
    the floor (``prune_to_floor(name, floor)``: its own top scores) and the others share what
    is left under a new threshold, until none falls under. Holding a layer only raises the
    others' threshold, so a held layer stays held. With floors of 0 this is the plain shared
    threshold; where the floors alone exceed ``kept``, every layer ends at its floor and the
    group short of its target.
    """
    held: list[str] = []
    while True:
        pool = [n for n in group if n not in held]
        left = max(kept - sum(floors[n] for n in held), 0)
        masks = prune_pool(pool, left) if pool else {}
        under = [n for n in pool if int(torch.count_nonzero(masks[n])) < floors[n]]
        if not under:
            return {**masks, **{n: prune_to_floor(n, floors[n]) for n in held}}
        held += under


def unstructured_masks(
    scores: dict[str, torch.Tensor],
    current: dict[str, torch.Tensor],
    targets: dict[str, float],
    global_groups: list[list[str]],
    min_density: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Element-wise keep-masks: layers alone at their target, global groups under one threshold.

    Args:
        scores: Per name, scores shaped like the weight (higher = kept).
        current: Per name, the keep-mask in force; its pruned entries stay pruned.
        targets: Per name, the fraction of zeros wanted. A layer alone gets exactly
            round(target * numel) zeros, or keeps its current mask if that already has more.
        global_groups: Names ranked together; a group's members share one target, applied to
            the group's total size.
        min_density: Fraction of its weights (its top scores) that every layer of a global
            group keeps at least (or all its survivors, if fewer), the others pruned further to
            still meet the target; where the floors alone exceed the group's budget, every
            layer keeps its floor. 0 ranks the group under one threshold, whatever it leaves.

    Raises:
        ValueError: Members of a global group have different targets.
    """
    out: dict[str, torch.Tensor] = {}

    def prune_pool(names: list[str], kept: int) -> dict[str, torch.Tensor]:
        flat_scores = torch.cat([_rankable(scores[n]).reshape(-1) for n in names])
        flat_current = torch.cat([current[n].reshape(-1).to(flat_scores.device) for n in names])
        keep = _ranked_prune(flat_scores, flat_current, flat_scores.numel() - kept)
        chunks = keep.split([scores[n].numel() for n in names])
        return {
            name: chunk.view(scores[name].shape).to(scores[name].device)
            for name, chunk in zip(names, chunks, strict=True)
        }

    for group in global_groups:
        size = sum(scores[n].numel() for n in group)
        floors = {
            n: min(
                floor_count(scores[n].numel(), min_density), int(torch.count_nonzero(current[n]))
            )
            for n in group
        }
        out.update(
            _floored_group(
                group,
                floors,
                size - round(_group_target(group, targets) * size),
                prune_pool,
                lambda n, kept: _layer_prune(scores[n], current[n], scores[n].numel() - kept),
            )
        )
    for name, score in scores.items():
        if name not in out:
            out[name] = _layer_prune(score, current[name], round(targets[name] * score.numel()))
    return out


def _layer_prune(score: torch.Tensor, current: torch.Tensor, n_zero: int) -> torch.Tensor:
    """One layer's keep-mask with ``n_zero`` zeros (or the ones it already has, if more)."""
    return _ranked_prune(score, current, n_zero).view(score.shape)


def check_nm_inputs(name: str, shape: Sequence[int], n: int, m: int) -> None:
    """Raises unless M divides the inputs of the weight ``name``.

    Args:
        name: The weight's qualified name.
        shape: Its shape in (out, in, *kernel) order.
        n: N of the pattern.
        m: M of the pattern.

    Raises:
        ValueError: Naming the structure, the weight, its inputs, M and the exact ``exclude``
            pattern that leaves out this layer alone.
    """
    if shape[1] % m:
        module = name.rpartition(".")[0] or name
        raise ValueError(
            f"`structure`='{n}:{m}': {name!r} has {shape[1]} inputs, not divisible by M={m}; "
            f"exclude this layer alone with `exclude=['^{module}']` or pick another M"
        )


def nm_masks(
    scores: dict[str, torch.Tensor], n: int, m: int, zeros_per_group: int
) -> dict[str, torch.Tensor]:
    """N:M keep-masks along the input dimension: the lowest ``zeros_per_group`` of every M.

    Linear weights (out, in) group M consecutive inputs; conv weights (out, in, *kernel) group M
    consecutive input channels at each (out, *kernel) position. Equal scores are pruned in
    index order.

    Args:
        scores: Per name, scores shaped like the weight (higher = kept).
        n: N of the pattern (for error messages).
        m: Group size M.
        zeros_per_group: Entries zeroed in every group: ``m - n`` for the final pattern, fewer
            on a gradual ramp.

    Raises:
        ValueError: ``zeros_per_group`` is outside [0, m], or an input dimension is not a
            multiple of M.
    """
    if not 0 <= zeros_per_group <= m:
        raise ValueError(f"`zeros_per_group` must be in [0, {m}], got {zeros_per_group}")
    out = {}
    for name, score in scores.items():
        # Inputs last, so that groups are runs of M along the flattened tensor.
        check_nm_inputs(name, score.shape, n, m)
        moved = _rankable(score).movedim(1, -1)
        groups = moved.reshape(-1, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        order = torch.sort(groups, dim=1, stable=True).indices[:, :zeros_per_group]
        keep.scatter_(1, order, False)
        out[name] = keep.view(moved.shape).movedim(-1, 1)
    return out


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flags the ``count`` lowest of 1-D ``scores``; equal scores in index order."""
    flags = torch.zeros_like(scores, dtype=torch.bool)
    flags[torch.sort(scores, stable=True).indices[:count]] = True
    return flags


def _rows_to_mask(dead: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Keep-mask of ``shape`` pruning the output channels (rows) flagged in ``dead``."""
    return (~dead).view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def _dead_rows(keep: torch.Tensor) -> torch.Tensor:
    """Output channels with any pruned entry: they stay pruned, and whole."""
    return ~keep.reshape(keep.shape[0], -1).all(dim=1)


def channel_masks(
    weights: dict[str, torch.Tensor],
    current: dict[str, torch.Tensor],
    targets: dict[str, float],
    global_groups: list[list[str]],
    min_density: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning whole output channels (dim 0), scored by their L2 norm.

    A channel with any entry pruned in ``current`` counts as pruned and stays so. Equal scores
    are pruned in index order.

    Args:
        weights: Per name, the weight (out, ...).
        current: Per name, the keep-mask in force.
        targets: Per name, the fraction of zeros wanted. A layer alone prunes
            round(target * out_channels) channels (or keeps more if already pruned).
        global_groups: Names ranked together by channel RMS (L2 norm / sqrt(channel size), so
            that layers of different widths compare); the lowest channels are pruned until the
            number of pruned weights is the closest to round(target * group size), which is
            within one channel.
        min_density: Fraction of its channels (its highest-norm ones) that every layer of a
            global group keeps at least (or all its live ones, if fewer); see
            :func:`unstructured_masks`.

    Raises:
        ValueError: Members of a global group have different targets.
    """
    out: dict[str, torch.Tensor] = {}
    for group in global_groups:
        # In weights, as the budget: whole channels of each layer's channel size.
        floors = {
            n: min(floor_count(weights[n].shape[0], min_density), _live_rows(current[n]))
            * _row_size(weights[n])
            for n in group
        }
        size = sum(weights[n].numel() for n in group)
        out.update(
            _floored_group(
                group,
                floors,
                size - round(_group_target(group, targets) * size),
                lambda names, kept: _pooled_channels(weights, current, names, kept),
                lambda n, kept: _layer_channels(
                    weights[n], current[n], weights[n].shape[0] - kept // _row_size(weights[n])
                ),
            )
        )
    for name, w in weights.items():
        if name not in out:
            out[name] = _layer_channels(w, current[name], round(targets[name] * w.shape[0]))
    return out


def _pooled_channels(
    weights: dict[str, torch.Tensor], current: dict[str, torch.Tensor], names: list[str], kept: int
) -> dict[str, torch.Tensor]:
    """Masks of ``names`` ranked together by channel RMS, keeping the nearest to ``kept``."""
    rms, sizes, dead_before = [], [], []
    for name in names:
        rows = weights[name].detach().to(torch.float64).reshape(weights[name].shape[0], -1)
        rms.append(rows.norm(dim=1).cpu() / math.sqrt(rows.shape[1]))
        sizes.append(torch.full((rows.shape[0],), rows.shape[1]))
        dead_before.append(_dead_rows(current[name]).cpu())
    was_dead = torch.cat(dead_before)
    score = torch.cat(rms).masked_fill(was_dead, float("-inf"))
    order = torch.sort(score, stable=True).indices
    # pruned[p]: weights pruned by the p lowest channels.
    pruned = [0, *torch.cumsum(torch.cat(sizes)[order], 0).tolist()]
    budget = pruned[-1] - kept
    reach = bisect.bisect_left(pruned, budget)
    below = max(reach - 1, 0)
    count = below if budget - pruned[below] < pruned[reach] - budget else reach
    dead = _lowest(score, max(count, int(was_dead.sum())))
    splits = dead.split([weights[n].shape[0] for n in names])
    return {
        name: _rows_to_mask(flags, weights[name].shape).to(weights[name].device)
        for name, flags in zip(names, splits, strict=True)
    }


def _row_size(w: torch.Tensor) -> int:
    """Weights in one output channel of ``w``."""
    return w.numel() // w.shape[0]


def _live_rows(keep: torch.Tensor) -> int:
    """Output channels with no pruned entry."""
    return keep.shape[0] - int(_dead_rows(keep).sum())


def _layer_channels(w: torch.Tensor, current: torch.Tensor, count: int) -> torch.Tensor:
    """One layer's mask pruning its ``count`` lowest-norm channels (or more, if already dead)."""
    was_dead = _dead_rows(current)
    norms = w.detach().to(torch.float64).reshape(w.shape[0], -1).norm(dim=1)
    dead = _lowest(norms.masked_fill(was_dead, float("-inf")), max(count, int(was_dead.sum())))
    return _rows_to_mask(dead, w.shape)
