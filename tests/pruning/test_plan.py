"""build_plan without a Trainer: per-layer schedules, overrides, rates and the global pool."""

import pytest
import torch

from lightning_compress.pruning import PruneConfig, build_plan
from lightning_compress.pruning.plan import check_targets, far_density

TARGETS = ["fc1.weight", "fc2.weight", "fc3.weight"]


def iterative(**kwargs):
    args = {"sparsity": 0.75, "schedule": "iterative", "rate": 0.5, "start": 0, "every": 1}
    return PruneConfig(**{**args, **kwargs})


def test_one_global_group_shares_one_schedule():
    plan = build_plan(PruneConfig(sparsity=0.8, schedule="linear"), TARGETS, 10, 30, 5)
    assert plan.global_groups == [TARGETS]
    assert len({id(s) for s in plan.schedules.values()}) == 1
    assert plan.schedules["fc1.weight"].events() == [10, 15, 20, 25, 30]
    assert plan.targets(30) == dict.fromkeys(TARGETS, 0.8)


def test_layer_scope_has_no_global_group():
    plan = build_plan(PruneConfig(scope="layer", schedule="oneshot"), TARGETS, 4, 4, 1)
    assert plan.global_groups == []
    assert plan.targets(4) == dict.fromkeys(TARGETS, 0.9)


def test_overrides_are_pruned_layer_wise_and_the_pool_holds_the_rest():
    config = PruneConfig(sparsity=0.9, schedule="oneshot", overrides={"fc3": 0.25})
    plan = build_plan(config, TARGETS, 8, 8, 1)
    assert plan.global_groups == [["fc1.weight", "fc2.weight"]]
    assert plan.targets(8) == {"fc1.weight": 0.9, "fc2.weight": 0.9, "fc3.weight": 0.25}
    weights = {
        n: torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
        for i, n in enumerate(TARGETS)
    }
    current = {n: torch.ones(8, 16, dtype=torch.bool) for n in TARGETS}
    masks = plan.masks(8, weights, current)
    assert int((~masks["fc3.weight"]).sum()) == round(0.25 * 128)
    assert int((~masks["fc1.weight"]).sum() + (~masks["fc2.weight"]).sum()) == round(0.9 * 256)


def test_rates_give_the_same_number_of_rounds_as_the_main_schedule():
    plan = build_plan(iterative(rates={"fc3": 0.1}), TARGETS, 2, 2, 3)
    main, output = plan.schedules["fc1.weight"], plan.schedules["fc3.weight"]
    assert main.events() == [2, 5]  # 1 - 0.5^2 = 0.75
    assert output.events() == main.events()
    assert output.final == pytest.approx(1 - 0.9**2)
    assert output.value_at(2) == pytest.approx(0.1)
    assert plan.global_groups == [["fc1.weight", "fc2.weight"]]


def test_ramp_ending_before_it_starts_raises_in_steps():
    config = PruneConfig(schedule="cubic", start="2ep", end="10it")  # units differ: unchecked
    with pytest.raises(ValueError, match=r"`end`=10it \(10 steps\) is before `start`=2ep"):
        build_plan(config, TARGETS, 16, 10, 8)


def test_a_oneshot_ignores_an_end_before_its_start():
    plan = build_plan(PruneConfig(schedule="oneshot", start="2ep", end="10it"), TARGETS, 16, 10, 8)
    assert plan.first_event() == plan.last_event() == 16


@pytest.mark.parametrize(
    ("config", "shapes", "match"),
    [
        (PruneConfig(overrides={"fc9": 0.5}), {"fc1.weight": (4, 8)}, "`overrides` pattern 'fc9'"),
        (iterative(rates={"fc9": 0.1}), {"fc1.weight": (4, 8)}, "`rates` pattern 'fc9'"),
        (
            iterative(rates={"fc1": 0.1}, overrides={"fc1": 0.5}),
            {"fc1.weight": (4, 8)},
            r"\['fc1.weight'\] match both `overrides` and `rates`",
        ),
        (
            PruneConfig(structure="2:4"),
            {"fc1.weight": (4, 8), "fc2.weight": (4, 6)},
            "'fc2.weight' has 6 inputs, not divisible by M=4",
        ),
    ],
)
def test_targets_that_cannot_be_planned_raise(config, shapes, match):
    with pytest.raises(ValueError, match=match):
        check_targets(config, shapes)


def test_the_plan_carries_min_density_to_the_global_group():
    assert build_plan(PruneConfig(), TARGETS, 0, 0, 1).min_density == PruneConfig().min_density
    config = PruneConfig(sparsity=0.9, schedule="oneshot", min_density=0.05)
    plan = build_plan(config, TARGETS, 0, 0, 1)
    assert plan.min_density == 0.05
    scores = {"fc1.weight": 1.0, "fc2.weight": 1.0, "fc3.weight": 1e-3}  # fc3 ranks lowest
    weights = {n: torch.full((8, 16), s) + torch.rand(8, 16) * 1e-4 for n, s in scores.items()}
    current = {n: torch.ones(8, 16, dtype=torch.bool) for n in TARGETS}
    masks = plan.masks(0, weights, current)
    assert int(masks["fc3.weight"].sum()) == 7  # 5% of 128 rounded up, not 0
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * 384)


def keeping(**kept):
    """Keep-masks of 10x100 weights, the first ``kept[name]`` of each kept."""
    masks = {}
    for name, k in kept.items():
        keep = torch.zeros(1000, dtype=torch.bool)
        keep[:k] = True
        masks[f"{name}.weight"] = keep.view(10, 100)
    return masks


def test_overpruned_reports_the_floor_and_layers_far_sparser_than_asked():
    config = PruneConfig(
        sparsity=0.9, schedule="linear", end=10, every=5, overrides={"fc3": 0.5}, min_density=0.004
    )
    plan = build_plan(config, TARGETS, 0, 10, 5)
    # fc1 at its floor (4 of 1000), fc2 under 1% kept while its group is to keep 10% (at the
    # end: the first event's lower target does not matter); fc3 is pruned alone.
    report = plan.overpruned(keeping(fc1=4, fc2=9, fc3=1))
    assert [(o.name, o.floored) for o in report] == [("fc1.weight", True), ("fc2.weight", False)]
    assert report[1].sparsity == pytest.approx(0.991) and report[1].target == 0.9
    assert plan.overpruned(keeping(fc1=10, fc2=10, fc3=1)) == []  # 1% kept is not reported


@pytest.mark.parametrize(("final", "density"), [(0.5, 0.01), (0.98, 0.01), (0.99, 0.0025)])
def test_far_sparser_is_under_one_percent_or_a_quarter_of_what_is_asked(final, density):
    assert far_density(final) == pytest.approx(density)


def test_a_global_run_to_99_percent_is_far_sparser_under_a_quarter_of_one_percent():
    plan = build_plan(
        PruneConfig(sparsity=0.99, schedule="oneshot", min_density=0), TARGETS, 0, 0, 1
    )
    # LeNet-300-100 at 99% keeps 0.49% of fc1: not reported; 0.2% is.
    assert [o.name for o in plan.overpruned(keeping(fc1=5, fc2=2, fc3=300))] == ["fc2.weight"]


def test_shortfalls_name_a_group_whose_floors_exceed_its_budget():
    plan = build_plan(
        PruneConfig(sparsity=0.9, schedule="oneshot", min_density=0.2), TARGETS, 0, 0, 1
    )
    (short,) = plan.shortfalls(0, keeping(fc1=200, fc2=200, fc3=200))
    assert short.names == TARGETS
    assert short.sparsity == pytest.approx(0.8) and short.target == 0.9
    assert plan.shortfalls(0, keeping(fc1=200, fc2=99, fc3=1)) == []
