"""Trainer-free low rank: config validation, rank plans, truncation and retraction."""

import itertools

import pytest
import torch

from lightning_compress.lowrank import (
    LowRankConfig,
    build_rank_plan,
    full_rank,
    kept_energy,
    rank_for_energy,
    retract,
    truncate,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `rank`"),
        ({"rank": 4, "energy": 0.9}, "exactly one of `rank`"),
        ({"rank": 0}, "`rank` must be >= 1"),
        ({"rank": -3}, "`rank` must be >= 1"),
        ({"rank": 1.5}, r"`rank` must be in \(0, 1\]"),
        ({"rank": 0.0}, r"`rank` must be in \(0, 1\]"),
        ({"rank": True}, "`rank` must be an int >= 1 or a float"),
        ({"rank": "8"}, "`rank` must be an int >= 1 or a float"),
        ({"rank": 2, "params": 0.5}, "exactly one of `rank`"),
        ({"params": 0.0}, r"`params` must be in \(0, 1\]"),
        ({"params": 2}, r"`params` must be in \(0, 1\]"),
        ({"energy": 0.0}, r"`energy` must be in \(0, 1\]"),
        ({"energy": 1.2}, r"`energy` must be in \(0, 1\]"),
        ({"rank": 4, "schedule": "iterative"}, "`schedule` must be one of"),
        ({"rank": 4, "method": "svd"}, "`method` must be one of"),
        ({"rank": 4, "every": 0}, "`every` must be at least one step"),
        ({"rank": 4, "start": "5ep", "end": "2ep"}, "is before `start`"),
        ({"rank": 4, "start": "-1"}, "`start` must be a non-negative int"),
        ({"rank": 4, "overrides": {"fc1": 0}}, "`overrides` rank for 'fc1' must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**kwargs)


def _matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def test_truncation_is_the_best_approximation_and_balances_its_factors():
    matrix = _matrix(40, 24)
    cut = truncate(matrix, 5)
    s = torch.linalg.svdvals(matrix)
    error = torch.linalg.matrix_norm(matrix - cut.first @ cut.second)
    assert torch.isclose(error, s[5:].square().sum().sqrt(), rtol=1e-4)  # Eckart-Young
    assert cut.first.shape == (40, 5) and cut.second.shape == (5, 24) and cut.rank == 5
    # The same norm per component on both sides: their per-channel integers stay balanced.
    assert torch.allclose(cut.first.norm(dim=0), cut.second.norm(dim=1), rtol=1e-4)
    assert torch.allclose(cut.basis.T @ cut.basis, torch.eye(5), atol=1e-5)


def test_retraction_keeps_the_rank_exactly_and_tracks_the_truncation():
    base = truncate(_matrix(64, 48), 6)
    matrix = base.first @ base.second
    step = 1e-3 * _matrix(64, 48, seed=1)  # one optimizer step's worth of change
    moved = matrix + step
    retracted = moved.clone()
    basis = retract(retracted, base.basis)
    s = torch.linalg.svdvals(retracted)
    assert float(s[6] / s[0]) < 1e-5  # rank <= 6, up to float32 rounding
    best = truncate(moved, 6)
    gap = torch.linalg.matrix_norm(retracted - best.first @ best.second)
    assert float(gap) < 1e-3 * float(torch.linalg.matrix_norm(step))  # second order in the step
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=1e-5)
    # A matrix already at its rank is left as it is.
    again = retracted.clone()
    retract(again, basis)
    assert torch.allclose(again, retracted, atol=1e-5)


def test_energy_picks_the_smallest_rank_that_holds_it():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert kept_energy(singular, 1) == pytest.approx(9 / 14)
    assert rank_for_energy(singular, 9 / 14) == 1
    assert rank_for_energy(singular, 0.7) == 2
    assert rank_for_energy(singular, 1.0) == 3  # the exact rank, not every zero
    assert rank_for_energy(torch.zeros(3), 0.5) == 1
    assert full_rank((20, 3, 5, 5)) == 20 and full_rank((200, 3, 5, 5)) == 75


def test_a_cubic_plan_lowers_the_rank_from_full_to_the_target():
    config = LowRankConfig(rank=4, schedule="cubic", start=0, end=100, every=10)
    plan = build_rank_plan(config, {"a": (32, 64), "b": (16, 8)}, start=0, end=100, every=10)
    ranks = [plan.rank_at("a", step) for step in range(0, 101, 10)]
    assert ranks[0] == 32 and ranks[-1] == 4
    assert all(x >= y for x, y in itertools.pairwise(ranks))
    assert plan.rank_at("b", 100) == 4 and plan.rank_at("a", 1000) == 4
    assert plan.is_event(50) and not plan.is_event(55)
    assert (plan.first_event(), plan.last_event()) == (0, 100)


def test_fractions_overrides_and_energy_in_a_plan():
    config = LowRankConfig(rank=0.25, schedule="oneshot", overrides={"b": 3})
    plan = build_rank_plan(config, {"net.a": (32, 64), "net.b": (16, 8)}, 5, 5, 1)
    assert plan.rank_at("net.a", 4) == 32  # before the event: full rank
    assert (plan.rank_at("net.a", 5), plan.rank_at("net.b", 5)) == (8, 3)
    energy = LowRankConfig(energy=0.5, schedule="oneshot")
    plan = build_rank_plan(energy, {"a": (4, 4)}, 0, 0, 1)
    assert plan.rank_at("a", 0, torch.tensor([3.0, 2.0, 1.0, 0.5])) == 1
    with pytest.raises(ValueError, match="needs the weight's singular values"):
        plan.rank_at("a", 0)


def test_plan_errors_name_the_layer_and_the_limit():
    with pytest.raises(ValueError, match=r"`rank`=40 is above the full rank 16 of 'b'"):
        build_rank_plan(LowRankConfig(rank=40), {"a": (64, 64), "b": (16, 8, 1, 2)}, 0, 10, 1)
    with pytest.raises(ValueError, match="`overrides` pattern 'fc9' matches none"):
        build_rank_plan(LowRankConfig(rank=2, overrides={"fc9": 1}), {"fc1": (8, 8)}, 0, 10, 1)
    with pytest.raises(ValueError, match="is before `start`"):
        build_rank_plan(LowRankConfig(rank=2, start="2ep", end=3), {"fc1": (8, 8)}, 20, 3, 1)


def test_randomized_truncation_is_near_best_and_seeded():
    from lightning_compress.lowrank.factors import randomized_truncate

    # A decaying spectrum, as trained weights have.
    u, _ = torch.linalg.qr(_matrix(300, 300, seed=2))
    v, _ = torch.linalg.qr(_matrix(200, 200, seed=3))
    spectrum = torch.logspace(0, -3, 200)
    matrix = (u[:, :200] * spectrum) @ v.T
    best = truncate(matrix, 20)
    fast = randomized_truncate(matrix, 20, seed=7)
    best_error = torch.linalg.matrix_norm(matrix - best.first @ best.second)
    fast_error = torch.linalg.matrix_norm(matrix - fast.first @ fast.second)
    assert float(fast_error) <= 1.01 * float(best_error)
    again = randomized_truncate(matrix, 20, seed=7)
    assert torch.equal(fast.first, again.first)  # no global RNG: the same seed, the same cut
    assert torch.allclose(fast.basis.T @ fast.basis, torch.eye(20), atol=1e-5)


def test_a_parameter_budget_gives_each_layer_the_largest_rank_within_it():
    config = LowRankConfig(params=1 / 6, schedule="oneshot")
    plan = build_rank_plan(
        config, {"fc1": (300, 784), "fc2": (100, 300), "c": (8, 8, 3, 3)}, 0, 0, 1
    )
    ranks = {n: plan.rank_at(n, 0) for n in plan.layers}
    assert ranks == {"fc1": 36, "fc2": 12, "c": 1}  # 36 * 1084 <= 784 * 300 / 6 < 37 * 1084
    for name, rank in ranks.items():
        layer = plan.layers[name]
        assert layer.params(rank) <= layer.out * layer.reduction / 6 or rank == 1
