"""ProxylessNAS's architecture parameters, path sampling and gradient estimator (Cai, Zhu and
Han, 2019), and the multiple-choice knapsack of the greedy baseline. Trainer-free.

Each searched layer ``l`` has logits ``alpha_l`` over its candidates, ``p_l = softmax(alpha_l)``.
A step samples one candidate per layer (binary gates ``g_l``, one-hot): only that path runs, so
memory is that of one model. With the layer's output ``y = sum_j g_j o_j``, the loss's gradient
in a gate is ``dL/dg_j = <dL/dy, o_j>``, and the binary-gate estimator of the logits' gradient
is ``dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i)``. For a weight-compression candidate
``o_j`` is linear in the candidate's weight ``W_j``, so ``<dL/dy, o_j> = <dL/dW, W_j>`` (plus
the bias term, the same for every candidate): one backward through the sampled path gives
every candidate's gate gradient exactly.

The latency term: the expected latency ``E = overhead + sum_l sum_j p_lj t_lj`` over the budget
``B``, weighted by ``lam``, is added to the loss; its gradient in ``alpha_lj`` is
``lam / B * p_lj (t_lj - E_l)``. ``lam`` is a Lagrange multiplier raised while ``E`` exceeds
``B`` (dual ascent), so the search converges to the budget instead of a hand-tuned weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    """The sampler's generator for optimizer step ``step``: a pure function of the seed and the
    step, so every rank, and a resumed run, samples the same paths."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def sample_paths(probs: Mapping[str, torch.Tensor], seed: int, step: int) -> dict[str, int]:
    """One candidate index per layer, drawn from ``probs`` (layers in sorted order)."""
    generator = step_generator(seed, step)
    return {
        name: int(torch.multinomial(probs[name].double(), 1, generator=generator))
        for name in sorted(probs)
    }


def alpha_grad(probs: torch.Tensor, gate_grad: torch.Tensor) -> torch.Tensor:
    """The binary-gate estimator: ``p_i (dL/dg_i - sum_j p_j dL/dg_j)``."""
    return probs * (gate_grad - (probs * gate_grad).sum())


def latency_grad(probs: torch.Tensor, latency: torch.Tensor) -> torch.Tensor:
    """Gradient of the layer's expected latency ``sum_j p_j t_j`` in its logits."""
    return probs * (latency - (probs * latency).sum())


def expected_latency(
    probs: Mapping[str, torch.Tensor], latency: Mapping[str, torch.Tensor], overhead: float
) -> float:
    return overhead + sum(float((probs[n] * latency[n]).sum()) for n in probs)


def configuration_latency(
    choices: Mapping[str, int], latency: Mapping[str, torch.Tensor], overhead: float
) -> float:
    return overhead + sum(float(latency[n][i]) for n, i in choices.items())


def fit_budget(
    choices: dict[str, int],
    probs: Mapping[str, torch.Tensor],
    latency: Mapping[str, torch.Tensor],
    overhead: float,
    budget: float,
) -> dict[str, int]:
    """The most probable path moved onto the budget where it exceeds it: repeatedly, the switch
    to a faster candidate that gives up the least log-probability per millisecond saved."""
    choices = dict(choices)
    while configuration_latency(choices, latency, overhead) > budget:
        best: tuple[float, str, int] | None = None
        for name, current in choices.items():
            t, logp = latency[name], probs[name].clamp_min(1e-30).log()
            for j in range(len(t)):
                saved = float(t[current] - t[j])
                if saved > 0:
                    cost = max(float(logp[current] - logp[j]), 0.0) / saved
                    if best is None or cost < best[0]:
                        best = (cost, name, j)
        if best is None:
            break  # already the fastest everywhere; the caller checked the budget is reachable
        choices[best[1]] = best[2]
    return choices


def knapsack(
    loss: Mapping[str, Sequence[float]],
    latency: Mapping[str, Sequence[float]],
    capacity: float,
    bins: int = 2000,
) -> dict[str, int]:
    """The multiple-choice knapsack: one candidate per layer, least total ``loss`` with total
    ``latency`` at most ``capacity`` (dynamic programming over ``bins`` latency steps, each
    layer's latency rounded up, so the answer never exceeds the capacity).

    Raises:
        ValueError: No configuration fits.
    """
    names = sorted(loss)
    unit = capacity / bins if capacity > 0 else 1.0
    inf = math.inf
    best = [0.0] + [inf] * bins  # best[c]: least loss using exactly c bins
    picks: list[list[int]] = []
    for name in names:
        cost = [min(bins + 1, math.ceil(float(t) / unit - 1e-9)) for t in latency[name]]
        new = [inf] * (bins + 1)
        pick = [-1] * (bins + 1)
        for c in range(bins + 1):
            if best[c] == inf:
                continue
            for j, w in enumerate(cost):
                if c + w <= bins and best[c] + loss[name][j] < new[c + w]:
                    new[c + w] = best[c] + loss[name][j]
                    pick[c + w] = j
        best = new
        picks.append(pick)
    end = min(range(bins + 1), key=lambda c: best[c])
    if best[end] == inf:
        raise ValueError("no configuration fits the latency budget")
    choices: dict[str, int] = {}
    c = end
    for name, pick in zip(reversed(names), reversed(picks), strict=True):
        j = pick[c]
        choices[name] = j
        c -= min(bins + 1, math.ceil(float(latency[name][j]) / unit - 1e-9))
    return choices
