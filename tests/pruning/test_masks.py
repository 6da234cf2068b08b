import pytest
import torch

from lightning_compress.pruning import (
    CriterionContext,
    channel_masks,
    get_criterion,
    nm_masks,
    parse_nm,
    register_criterion,
    unstructured_masks,
)
from lightning_compress.pruning.plan import PrunePlan
from lightning_compress.pruning.schedules import Schedule

SHAPES = [(7, 13), (300, 784), (1, 1), (5, 3, 3, 3)]


def full(shape):
    return torch.ones(shape, dtype=torch.bool)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", [0.0, 0.33, 0.5, 0.9, 0.999])
def test_layer_masks_zero_exactly_the_target_count(shape, target):
    torch.manual_seed(0)
    w = torch.randn(shape)
    (mask,) = unstructured_masks({"w": w.abs()}, {"w": full(shape)}, {"w": target}, []).values()
    assert mask.shape == w.shape
    assert int((~mask).sum()) == round(target * w.numel())
    if 0 < (~mask).sum() < w.numel():
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_global_group_uses_one_threshold_over_layers_of_different_sizes():
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 40), "b": torch.randn(7, 11) * 3, "c": torch.randn(3, 5) * 0.1}
    scores = {k: v.abs() for k, v in weights.items()}
    current = {k: full(v.shape) for k, v in weights.items()}
    masks = unstructured_masks(scores, current, dict.fromkeys(weights, 0.8), [list(weights)])
    total = sum(v.numel() for v in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)
    kept = torch.cat([scores[k][masks[k]] for k in weights])
    pruned = torch.cat([scores[k][~masks[k]] for k in weights])
    assert pruned.max() <= kept.min()
    assert masks["c"].sum() < masks["b"].sum()  # small weights go first, whatever their layer


def test_pruning_is_monotone_and_deterministic():
    torch.manual_seed(0)
    w = torch.randn(20, 20)
    mask = full(w.shape)
    for target in (0.2, 0.5, 0.7):
        # Scores change between events (training), but pruned entries stay pruned.
        scores = (w + 0.5 * torch.randn_like(w)).abs()
        new = unstructured_masks({"w": scores}, {"w": mask}, {"w": target}, [])["w"]
        assert torch.all(new <= mask)
        assert int((~new).sum()) == round(target * 400)
        again = unstructured_masks({"w": scores}, {"w": mask}, {"w": target}, [])["w"]
        assert torch.equal(new, again)
        mask = new
    # A lower target never un-prunes.
    lower = unstructured_masks({"w": w.abs()}, {"w": mask}, {"w": 0.1}, [])["w"]
    assert torch.equal(lower, mask)


def test_ties_are_broken_by_position():
    scores = torch.zeros(10)
    (mask,) = unstructured_masks({"w": scores}, {"w": full(10)}, {"w": 0.3}, []).values()
    assert mask.tolist() == [False] * 3 + [True] * 7


@pytest.mark.parametrize(
    ("structure", "expected"),
    [("2:4", (2, 4)), ("1:8", (1, 8)), ("unstructured", None), ("channel", None)],
)
def test_parse_nm(structure, expected):
    assert parse_nm(structure) == expected


@pytest.mark.parametrize("structure", ["4:4", "5:4", "0:4"])
def test_parse_nm_rejects(structure):
    with pytest.raises(ValueError, match="`structure`"):
        parse_nm(structure)


@pytest.mark.parametrize("shape", [(8, 16), (3, 8, 3, 3), (5, 8)])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_masks_every_group_keeps_at_most_n(shape, n, m):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = nm_masks({"w": w.abs()}, n, m, m - n)["w"]
    grouped = mask.movedim(1, -1) if w.dim() > 2 else mask
    counts = grouped.reshape(-1, m).sum(dim=1)
    assert torch.all(counts == n)
    # The kept ones are the largest of their group.
    gw = (w.abs().movedim(1, -1) if w.dim() > 2 else w.abs()).reshape(-1, m)
    gm = grouped.reshape(-1, m)
    for row_w, row_m in zip(gw, gm, strict=True):
        assert row_w[~row_m].max() <= row_w[row_m].min()


def test_nm_divisibility_error_names_the_layer():
    with pytest.raises(ValueError, match=r"'fc'.*6 inputs"):
        nm_masks({"fc": torch.randn(3, 6)}, 2, 4, 2)


def test_channel_masks_prune_whole_rows_per_layer_and_globally():
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 6), "b": torch.randn(4, 2, 3, 3) * 0.01}
    current = {k: full(v.shape) for k, v in weights.items()}
    per_layer = channel_masks(weights, current, {"a": 0.3, "b": 0.5}, [])
    assert int((~per_layer["a"]).all(dim=1).sum()) == 3
    assert int((~per_layer["b"].reshape(4, -1)).all(dim=1).sum()) == 2
    glob = channel_masks(weights, current, {"a": 0.4, "b": 0.4}, [["a", "b"]])
    pruned = sum(int((~m).sum()) for m in glob.values())
    total = 60 + 72
    assert round(0.4 * total) <= pruned < round(0.4 * total) + 18  # < one channel over
    # The tiny layer's channels rank lowest by RMS: 3 of its 18-weight channels reach 53 weights.
    assert int((~glob["b"].reshape(4, -1)).all(dim=1).sum()) == 3
    assert glob["a"].all()
    for m in glob.values():
        rows = m.reshape(m.shape[0], -1)
        assert torch.all(rows.all(dim=1) | (~rows).all(dim=1))


def test_random_criterion_is_reproducible_per_step_and_name():
    rand = get_criterion("random")
    w = torch.zeros(50)
    a = rand(w, CriterionContext("x", step=3, seed=1))
    assert torch.equal(a, rand(w, CriterionContext("x", step=3, seed=1)))
    assert not torch.equal(a, rand(w, CriterionContext("x", step=4, seed=1)))
    assert not torch.equal(a, rand(w, CriterionContext("y", step=3, seed=1)))


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("magnitude")(lambda w, ctx: w)
    with pytest.raises(ValueError, match=r"`criterion` must be one of \['magnitude'"):
        get_criterion("nope")


def test_plan_ramps_nm_groups_gradually():
    sched = Schedule("linear", final=0.5, start=0, end=10, every=5)
    plan = PrunePlan({"w": sched}, structure="2:4")
    w = torch.randn(4, 8)
    current = {"w": full(w.shape)}
    half = plan.masks(5, {"w": w}, current)["w"]
    assert torch.all(half.reshape(-1, 4).sum(dim=1) == 3)  # one zero per group at mid-ramp
    final = plan.masks(10, {"w": w}, {"w": half})["w"]
    assert torch.all(final.reshape(-1, 4).sum(dim=1) == 2)
    assert torch.all(final <= half)
