"""Scores and target sparsities to hard keep-masks (True = kept).

Pruning is monotone: a weight the current mask pruned stays pruned (it ranks below everything).
Counts are exact: a target t over n weights zeros exactly round(t * n) of them, and ties are
broken by position, so every rank and every resume computes identical masks.
"""

from __future__ import annotations

import math
import re

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(structure: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): at most N non-zeros in every group of M; None for other structures.

    Raises:
        ValueError: An N:M string with N < 1 or N >= M.
    """
    match = _NM.match(structure) if isinstance(structure, str) else None
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"`structure` N:M needs 1 <= N < M, got {structure!r}")
    return n, m


def _ranked_prune(scores: torch.Tensor, current: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Keep-mask (flat) zeroing the ``n_zero`` lowest scores, already-pruned entries first."""
    flat = scores.detach().reshape(-1).to(torch.float64)
    flat = flat.masked_fill(~current.reshape(-1), float("-inf"))
    already = int((~current).sum())
    n_zero = max(n_zero, already)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_zero > 0:
        # Stable sort: equal scores are pruned in index order, deterministically.
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_zero]] = False
    return keep


def unstructured_masks(
    scores: dict[str, torch.Tensor],
    current: dict[str, torch.Tensor],
    targets: dict[str, float],
    global_groups: list[list[str]],
) -> dict[str, torch.Tensor]:
    """Element-wise masks: layers alone at their target, global groups under one threshold."""
    out: dict[str, torch.Tensor] = {}
    grouped = {name for group in global_groups for name in group}
    for group in global_groups:
        flat_scores = torch.cat([scores[n].reshape(-1).float().cpu() for n in group])
        flat_current = torch.cat([current[n].reshape(-1).cpu() for n in group])
        n_zero = round(targets[group[0]] * flat_scores.numel())
        keep = _ranked_prune(flat_scores, flat_current, n_zero)
        offset = 0
        for name in group:
            size = scores[name].numel()
            chunk = keep[offset : offset + size].view(scores[name].shape)
            out[name] = chunk.to(scores[name].device)
            offset += size
    for name, score in scores.items():
        if name not in grouped:
            n_zero = round(targets[name] * score.numel())
            out[name] = _ranked_prune(score, current[name], n_zero).view(score.shape)
    return out


def nm_masks(
    scores: dict[str, torch.Tensor], n: int, m: int, zeros_per_group: int
) -> dict[str, torch.Tensor]:
    """N:M masks along the input dimension: the lowest ``zeros_per_group`` of every M inputs.

    Linear weights (out, in) group consecutive inputs; conv weights (out, in, kh, kw) group input
    channels at each (out, kh, kw) position.

    Raises:
        ValueError: The input dimension is not a multiple of M.
    """
    out = {}
    for name, score in scores.items():
        s = score.detach().float()
        moved = s.movedim(1, -1) if s.dim() > 2 else s
        if moved.shape[-1] % m:
            raise ValueError(
                f"`structure`={n}:{m}: {name!r} has {moved.shape[-1]} inputs, not divisible by {m}"
            )
        groups = moved.reshape(-1, m)
        keep = torch.ones_like(groups, dtype=torch.bool)
        if zeros_per_group > 0:
            order = torch.sort(groups, dim=1, stable=True).indices[:, :zeros_per_group]
            keep.scatter_(1, order, False)
        keep = keep.view(moved.shape)
        out[name] = keep.movedim(-1, 1) if s.dim() > 2 else keep
    return out


def channel_masks(
    weights: dict[str, torch.Tensor],
    current: dict[str, torch.Tensor],
    targets: dict[str, float],
    global_groups: list[list[str]],
) -> dict[str, torch.Tensor]:
    """Whole output channels (dim 0) by L2 norm; already-pruned channels stay pruned.

    A layer alone prunes round(target * channels) channels. A global group ranks channels of all
    its layers by RMS (norm / sqrt(channel size), comparable across layer sizes) and prunes the
    lowest until round(target * weights) weights are pruned, overshooting by less than a channel.
    """
    out: dict[str, torch.Tensor] = {}

    def channel_keep(name: str, dead: torch.Tensor) -> torch.Tensor:
        shape = weights[name].shape
        return (~dead).view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()

    grouped = {name for group in global_groups for name in group}
    for group in global_groups:
        rms, sizes, owners, was_dead = [], [], [], []
        for name in group:
            w = weights[name].detach().float().reshape(weights[name].shape[0], -1)
            rms.append(w.norm(dim=1).cpu() / math.sqrt(w.shape[1]))
            sizes.append(torch.full((w.shape[0],), w.shape[1]))
            owners.append(name)
            was_dead.append(~current[name].reshape(w.shape[0], -1).all(dim=1).cpu())
        score = torch.cat(rms).to(torch.float64).masked_fill(torch.cat(was_dead), float("-inf"))
        size = torch.cat(sizes)
        budget = round(targets[group[0]] * int(size.sum()))
        order = torch.sort(score, stable=True).indices
        cumulative = torch.cumsum(size[order], 0)
        # Smallest prefix whose pruned weights reach the budget (or all already-dead channels).
        n_dead = int((cumulative < budget).sum()) + (1 if budget > 0 else 0)
        n_dead = max(min(n_dead, len(order)), int(torch.cat(was_dead).sum()))
        dead = torch.zeros(len(order), dtype=torch.bool)
        dead[order[:n_dead]] = True
        offset = 0
        for name in owners:
            rows = weights[name].shape[0]
            out[name] = channel_keep(name, dead[offset : offset + rows]).to(weights[name].device)
            offset += rows
    for name, w in weights.items():
        if name in grouped:
            continue
        rows = w.shape[0]
        norms = w.detach().float().reshape(rows, -1).norm(dim=1).to(torch.float64)
        was_dead = ~current[name].reshape(rows, -1).all(dim=1)
        norms = norms.masked_fill(was_dead, float("-inf"))
        n_dead = max(round(targets[name] * rows), int(was_dead.sum()))
        dead = torch.zeros(rows, dtype=torch.bool, device=w.device)
        dead[torch.sort(norms, stable=True).indices[:n_dead]] = True
        out[name] = channel_keep(name, dead)
    return out
