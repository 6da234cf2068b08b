import pytest
import torch

from lightning_compress.pruning import (
    channel_masks,
    count_zeros,
    floor_count,
    nm_masks,
    parse_nm,
    sparsity,
    unstructured_masks,
)
from lightning_compress.pruning.plan import PrunePlan
from lightning_compress.pruning.schedules import Schedule

SHAPES = [(7, 13), (300, 784), (1, 1), (1,), (5, 3, 3, 3), (3, 1, 5)]


def full(shape):
    return torch.ones(shape, dtype=torch.bool)


def zeros(mask):
    return int((~mask).sum())


def reference_prune(scores, current, n_zero):
    """The specification: stable sort of the scores, already-pruned first, lower index first."""
    flat = scores.reshape(-1).double().masked_fill(~current.reshape(-1), float("-inf"))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: max(n_zero, zeros(current))]] = False
    return keep.view(scores.shape)


def group_rows(mask, m):
    """Groups of M along the input dimension, as rows."""
    return mask.movedim(1, -1).reshape(-1, m)


# -- unstructured ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", [0.0, 0.33, 0.5, 0.9, 0.999])
def test_layer_masks_zero_exactly_the_target_count(shape, target):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape)
    (mask,) = unstructured_masks({"w": w.abs()}, {"w": full(shape)}, {"w": target}, []).values()
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert zeros(mask) == round(target * w.numel())
    if 0 < zeros(mask) < w.numel():
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_scores_rank_like_their_exact_values(dtype):
    torch.manual_seed(0)
    scores = torch.randn(37, 29).abs().to(dtype)  # half precision: many exact ties
    current = torch.rand(37, 29) > 0.1
    mask = unstructured_masks({"w": scores}, {"w": current}, {"w": 0.6}, [])["w"]
    assert zeros(mask) == round(0.6 * scores.numel())
    assert torch.equal(mask, reference_prune(scores, current, round(0.6 * scores.numel())))


def test_float64_scores_are_ranked_in_float64():
    # Distinct in float64, equal in float32: index order would prune the first three.
    scores = 1 + 1e-12 * torch.arange(10, 0, -1, dtype=torch.float64)
    (mask,) = unstructured_masks({"w": scores}, {"w": full(10)}, {"w": 0.3}, []).values()
    assert mask.tolist() == [True] * 7 + [False] * 3


def test_ties_are_pruned_in_index_order():
    scores = torch.zeros(10)
    (mask,) = unstructured_masks({"w": scores}, {"w": full(10)}, {"w": 0.3}, []).values()
    assert mask.tolist() == [False] * 3 + [True] * 7


def test_global_group_uses_one_threshold_over_layers_of_different_sizes():
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 41), "b": torch.randn(7, 11) * 3, "c": torch.randn(3, 5) * 0.1}
    scores = {k: v.abs() for k, v in weights.items()}
    current = {k: full(v.shape) for k, v in weights.items()}
    masks = unstructured_masks(scores, current, dict.fromkeys(weights, 0.8), [list(weights)])
    total = sum(v.numel() for v in weights.values())
    assert count_zeros(masks) == round(0.8 * total)
    kept = torch.cat([scores[k][masks[k]] for k in weights])
    pruned = torch.cat([scores[k][~masks[k]] for k in weights])
    assert pruned.max() <= kept.min()
    # Small weights go first, whatever their layer.
    assert sparsity(masks["c"]) > sparsity(masks["a"]) > sparsity(masks["b"])


def test_global_ties_are_pruned_in_group_order():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    current = {k: full(v.shape) for k, v in scores.items()}
    masks = unstructured_masks(scores, current, {"a": 0.5, "b": 0.5}, [["b", "a"]])
    assert masks["b"].tolist() == [False] * 4
    assert masks["a"].tolist() == [[False, True, True], [True, True, True]]


def test_layers_outside_the_group_keep_their_own_target():
    torch.manual_seed(0)
    scores = {"a": torch.rand(10, 10), "b": torch.rand(6, 6), "out": torch.rand(10, 3)}
    current = {k: full(v.shape) for k, v in scores.items()}
    targets = {"a": 0.5, "b": 0.5, "out": 0.2}
    masks = unstructured_masks(scores, current, targets, [["a", "b"]])
    assert zeros(masks["a"]) + zeros(masks["b"]) == round(0.5 * 136)
    assert zeros(masks["out"]) == 6


def test_a_group_with_different_targets_is_rejected():
    scores = {"a": torch.rand(4), "b": torch.rand(4)}
    current = {k: full(4) for k in scores}
    with pytest.raises(ValueError, match=r"`targets` of a global group must be equal.*'b': 0.3"):
        unstructured_masks(scores, current, {"a": 0.5, "b": 0.3}, [["a", "b"]])


@pytest.mark.parametrize("group", [False, True])
def test_pruning_is_monotone_and_deterministic(group):
    torch.manual_seed(0)
    w = {"a": torch.randn(20, 21), "b": torch.randn(9)}
    groups = [["a", "b"]] if group else []
    masks = {k: full(v.shape) for k, v in w.items()}
    for target in (0.2, 0.5, 0.7, 0.95):
        # Scores change between events (training), but pruned entries stay pruned.
        scores = {k: (v + 0.5 * torch.randn_like(v)).abs() for k, v in w.items()}
        targets = dict.fromkeys(w, target)
        new = unstructured_masks(scores, masks, targets, groups)
        assert all(torch.all(new[k] <= masks[k]) for k in w)
        if group:
            assert count_zeros(new) == round(target * 429)
        else:
            assert [zeros(new[k]) for k in w] == [round(target * 420), round(target * 9)]
        again = unstructured_masks(scores, masks, targets, groups)
        assert all(torch.equal(new[k], again[k]) for k in w)
        masks = new
    # A target below the current sparsity never un-prunes.
    lower = unstructured_masks(w, masks, dict.fromkeys(w, 0.1), groups)
    assert all(torch.equal(lower[k], masks[k]) for k in w)


@pytest.mark.parametrize("n", [10, 5_000, 100_003])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("pre_pruned", [False, True])
def test_fast_selection_equals_a_stable_sort(n, ties, pre_pruned):
    from lightning_compress.pruning.masks import _ranked_prune, kth_smallest

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    if ties:
        x = torch.round(x * 4) / 4  # many equal scores at any threshold
    current = torch.rand(n, generator=g) > 0.3 if pre_pruned else torch.ones(n, dtype=torch.bool)
    for k in torch.randint(1, n + 1, (5,), generator=g).tolist():
        assert kth_smallest(x, k) == x.kthvalue(k).values
        assert torch.equal(_ranked_prune(x, current, k), reference_prune(x, current, k))


def test_fast_selection_handles_infinite_scores():
    from lightning_compress.pruning.masks import kth_smallest

    x = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    x[::7] = float("-inf")
    x[1::7] = float("inf")
    for k in (1, 7_000, 7_200, 30_000, 50_000):
        assert kth_smallest(x, k) == x.kthvalue(k).values


def test_sparsity_helpers():
    masks = {
        "a": torch.tensor([True, False, False, True]),
        "b": torch.zeros(2, 3, dtype=torch.bool),
    }
    assert sparsity(masks["a"]) == 0.5
    assert sparsity(masks["b"]) == 1.0
    assert count_zeros(masks) == 8


# -- N:M ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("structure", "expected"),
    [
        ("2:4", (2, 4)),
        ("1:8", (1, 8)),
        (" 3 : 16 ", (3, 16)),
        ("unstructured", None),
        ("channel", None),
    ],
)
def test_parse_nm(structure, expected):
    assert parse_nm(structure) == expected


@pytest.mark.parametrize(
    "structure", ["4:4", "5:4", "0:4", "2.5:4", "2:4.0", "a:b", "2:4:8", "-1:4", "blocks", "", None]
)
def test_parse_nm_rejects_naming_the_value_and_the_forms(structure):
    with pytest.raises(
        ValueError, match="`structure` must be 'unstructured', 'channel' or 'N:M'"
    ) as e:
        parse_nm(structure)
    assert str(e.value).endswith(f"got {structure!r}")
    assert "'2:4'" in str(e.value)


@pytest.mark.parametrize(
    ("shape", "n", "m"),
    [
        ((8, 16), 2, 4),
        ((5, 8), 1, 4),
        ((5, 8), 3, 8),
        ((3, 8, 3, 3), 2, 4),
        ((3, 16, 3, 3), 3, 8),
        ((4, 12, 5), 2, 4),
        ((2, 4, 1, 1), 1, 4),
    ],
)
def test_nm_masks_keep_the_n_largest_of_every_group(shape, n, m):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = nm_masks({"w": w.abs()}, n, m, m - n)["w"]
    assert mask.shape == w.shape
    rows_w, rows_m = group_rows(w.abs(), m), group_rows(mask, m)
    assert torch.all(rows_m.sum(dim=1) == n)
    for row_w, row_m in zip(rows_w, rows_m, strict=True):
        assert row_w[~row_m].max() <= row_w[row_m].min()


def test_nm_groups_conv_weights_along_input_channels():
    # Scores rise along the kernel but, within each run of 4 input channels, fall: grouping
    # along anything but the input channels would pick other weights.
    scores = -torch.arange(8.0).view(1, 8, 1, 1) + 100 * torch.arange(3.0).view(1, 1, 1, 3)
    mask = nm_masks({"conv": scores.expand(2, 8, 3, 3)}, 2, 4, 2)["conv"]
    expected = torch.tensor([True, True, False, False] * 2).view(1, 8, 1, 1).expand(2, 8, 3, 3)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("zeros_per_group", [0, 1, 2, 4])
def test_nm_ramps_by_zeros_per_group(zeros_per_group):
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mask = nm_masks({"fc": scores}, 2, 4, zeros_per_group)["fc"]
    assert torch.all((~group_rows(mask, 4)).sum(dim=1) == zeros_per_group)


def test_nm_ties_are_pruned_in_index_order_and_deterministic():
    scores = torch.zeros(2, 8)
    mask = nm_masks({"fc": scores}, 2, 4, 2)["fc"]
    assert mask.tolist() == [[False, False, True, True] * 2] * 2
    assert torch.equal(mask, nm_masks({"fc": scores}, 2, 4, 2)["fc"])


@pytest.mark.parametrize(("name", "shape"), [("fc", (3, 6)), ("conv", (4, 6, 3, 3))])
def test_nm_divisibility_error_names_the_structure_layer_size_and_m(name, shape):
    match = rf"`structure`='2:4': '{name}' has 6 inputs, not divisible by M=4"
    with pytest.raises(ValueError, match=match):
        nm_masks({name: torch.randn(shape)}, 2, 4, 2)


@pytest.mark.parametrize("zeros_per_group", [-1, 5])
def test_nm_rejects_zeros_per_group_outside_the_group(zeros_per_group):
    with pytest.raises(
        ValueError, match=rf"`zeros_per_group` must be in \[0, 4\], got {zeros_per_group}"
    ):
        nm_masks({"fc": torch.randn(2, 8)}, 2, 4, zeros_per_group)


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


# -- channels -------------------------------------------------------------------------------------


def dead_channels(mask):
    rows = mask.reshape(mask.shape[0], -1)
    assert torch.all(rows.all(dim=1) | (~rows).all(dim=1)), "a channel is only partly pruned"
    return (~rows).all(dim=1)


@pytest.mark.parametrize("shape", [(10, 6), (7, 3, 3, 3), (5, 1), (1, 4)])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_layer_channel_masks_prune_the_lowest_norm_rows(shape, target):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = channel_masks({"w": w}, {"w": full(shape)}, {"w": target}, [])["w"]
    assert mask.shape == w.shape
    dead = dead_channels(mask)
    assert int(dead.sum()) == round(target * shape[0])
    norms = w.reshape(shape[0], -1).norm(dim=1)
    if 0 < dead.sum() < shape[0]:
        assert norms[dead].max() <= norms[~dead].min()


def test_global_channel_masks_rank_by_rms_and_land_closest_to_the_budget():
    torch.manual_seed(0)
    weights = {
        "a": torch.randn(10, 6),
        "b": torch.randn(4, 2, 3, 3) * 0.01,
        "c": torch.randn(9, 5) * torch.linspace(0.1, 2, 9).view(9, 1),
    }
    current = {k: full(v.shape) for k, v in weights.items()}
    sizes = torch.cat([torch.full((v.shape[0],), v[0].numel()) for v in weights.values()])
    rms = torch.cat([v.reshape(v.shape[0], -1).norm(dim=1) for v in weights.values()])
    rms = rms / sizes.sqrt()
    pruned_by_prefix = [0, *torch.cumsum(sizes[torch.sort(rms).indices], 0).tolist()]
    for target in (0.1, 0.25, 0.4, 0.6, 0.9):
        masks = channel_masks(weights, current, dict.fromkeys(weights, target), [list(weights)])
        dead = torch.cat([dead_channels(m) for m in masks.values()])
        assert rms[dead].max() <= rms[~dead].min()  # the lowest RMS channels, across layers
        budget = round(target * int(sizes.sum()))
        assert count_zeros(masks) in pruned_by_prefix
        assert abs(count_zeros(masks) - budget) == min(abs(p - budget) for p in pruned_by_prefix)
    # The tiny layer's channels rank lowest by RMS, whatever its channel size.
    assert dead_channels(
        channel_masks(weights, current, dict.fromkeys(weights, 0.1), [list(weights)])["b"]
    ).any()


@pytest.mark.parametrize("group", [False, True])
def test_equal_channels_are_pruned_in_index_order(group):
    weights = {"a": torch.ones(4, 3), "b": torch.ones(6, 3)}
    current = {k: full(v.shape) for k, v in weights.items()}
    masks = channel_masks(
        weights, current, dict.fromkeys(weights, 0.5), [list(weights)] if group else []
    )
    if group:
        assert (
            dead_channels(masks["a"]).all()
            and dead_channels(masks["b"]).tolist() == [True] + [False] * 5
        )
    else:
        assert dead_channels(masks["b"]).tolist() == [True] * 3 + [False] * 3


@pytest.mark.parametrize("group", [False, True])
def test_channel_masks_are_monotone(group):
    torch.manual_seed(0)
    w = {"a": torch.randn(12, 5), "b": torch.randn(6, 3, 2, 2)}
    groups = [["a", "b"]] if group else []
    masks = {k: full(v.shape) for k, v in w.items()}
    for target in (0.2, 0.5, 0.8):
        moved = {k: v + 0.7 * torch.randn_like(v) for k, v in w.items()}
        new = channel_masks(moved, masks, dict.fromkeys(w, target), groups)
        assert all(torch.all(new[k] <= masks[k]) for k in w)
        assert all(
            torch.equal(new[k], channel_masks(moved, masks, dict.fromkeys(w, target), groups)[k])
            for k in w
        )
        masks = new
    lower = channel_masks(w, masks, dict.fromkeys(w, 0.1), groups)
    assert all(torch.equal(lower[k], masks[k]) for k in w)


# -- the min_density floor of global groups ------------------------------------------------------


def mlp_pair(d_model=256, d_hidden=688, seed=0):
    """An LLM MLP's up/down projections at default nn.Linear init, scaled down from 4096->11008:
    the same fan-in ratio (11008 / 4096 ~ 688 / 256), so the down projection's weights are all
    smaller than most of the up projection's."""
    torch.manual_seed(seed)
    up, down = torch.nn.Linear(d_model, d_hidden), torch.nn.Linear(d_hidden, d_model)
    return {"up": up.weight.detach().abs(), "down": down.weight.detach().abs()}


def prune_pair(scores, target, min_density, current=None):
    current = current or {k: full(v.shape) for k, v in scores.items()}
    targets = dict.fromkeys(scores, target)
    return unstructured_masks(scores, current, targets, [list(scores)], min_density=min_density)


def test_one_threshold_empties_the_wider_fan_in_layer_without_a_floor():
    scores = mlp_pair()
    masks = prune_pair(scores, 0.9, min_density=0.0)
    assert sparsity(masks["down"]) == 1.0  # layer collapse: the network is cut in two
    assert count_zeros(masks) == round(0.9 * 2 * 256 * 688)


@pytest.mark.parametrize("min_density", [0.005, 0.02, 0.05])
def test_the_floor_keeps_the_layers_top_scores_and_the_others_meet_the_target(min_density):
    scores = mlp_pair()
    masks = prune_pair(scores, 0.9, min_density)
    numel = scores["down"].numel()
    assert int(masks["down"].sum()) == floor_count(numel, min_density)
    assert 1 - sparsity(masks["down"]) >= min_density
    assert count_zeros(masks) == round(0.9 * 2 * numel)  # the group's total is still met
    for name, keep in masks.items():  # each layer's own top scores survive
        assert scores[name][~keep].max() <= scores[name][keep].min()
    assert scores["up"][masks["up"]].min() >= scores["down"][masks["down"]].min()


@pytest.mark.parametrize("target", [0.3, 0.6, 0.9, 0.99])
def test_a_floor_that_does_not_bind_changes_nothing(target):
    torch.manual_seed(0)
    scores = {"a": torch.rand(30, 41), "b": torch.rand(7, 11) * 3, "c": torch.rand(3, 5) + 0.5}
    plain = prune_pair(scores, target, 0.0)
    low = min(1 - sparsity(m) for m in plain.values())
    floored = prune_pair(scores, target, low)
    assert all(torch.equal(plain[k], floored[k]) for k in scores)


def test_floors_beyond_the_budget_are_kept_and_the_target_is_missed():
    scores = mlp_pair(32, 86)
    masks = prune_pair(scores, 0.9, 0.2)  # 20% of each layer is more than the 10% asked
    assert [int(m.sum()) for m in masks.values()] == [floor_count(32 * 86, 0.2)] * 2
    assert count_zeros(masks) < round(0.9 * 2 * 32 * 86)


def test_the_floor_never_un_prunes():
    scores = mlp_pair(32, 86)
    current = {k: full(v.shape) for k, v in scores.items()}
    current["down"] = torch.rand(scores["down"].shape, generator=torch.Generator().manual_seed(0))
    current["down"] = current["down"] > 0.999  # a layer already below the floor stays there
    masks = prune_pair(scores, 0.9, 0.05, current)
    assert torch.equal(masks["down"], current["down"])
    assert count_zeros(masks) == round(0.9 * 2 * 32 * 86)
    for target in (0.95, 0.98):  # and a held layer shrinks no further than its floor
        again = prune_pair(scores, target, 0.05, masks)
        assert all(torch.all(again[k] <= masks[k]) for k in masks)
        assert torch.equal(again["down"], masks["down"])
        masks = again


def test_global_channels_keep_their_floor_of_channels():
    torch.manual_seed(0)
    weights = {"wide": torch.randn(40, 8), "small": torch.randn(20, 8) * 0.01}
    current = {k: full(v.shape) for k, v in weights.items()}
    targets = dict.fromkeys(weights, 0.5)
    plain = channel_masks(weights, current, targets, [list(weights)])
    assert dead_channels(plain["small"]).all()
    masks = channel_masks(weights, current, targets, [list(weights)], min_density=0.1)
    assert int((~dead_channels(masks["small"])).sum()) == 2  # ceil(0.1 * 20) channels
    norms = weights["small"].norm(dim=1)
    assert norms[dead_channels(masks["small"])].max() <= norms[~dead_channels(masks["small"])].min()
    assert count_zeros(masks) == round(0.5 * 480)


def test_the_floor_rounds_up_and_ignores_float_noise():
    assert floor_count(235200, 0.01) == 2352
    assert floor_count(176128, 0.005) == 881
    assert floor_count(10, 0.0) == 0
    assert floor_count(3, 0.001) == 1
