import builtins

import pytest
import torch

from lightning_compress.pruning import criteria
from lightning_compress.pruning.criteria import (
    CRITERIA,
    CriterionContext,
    get_criterion,
    register_criterion,
)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so tests can register freely."""
    monkeypatch.setattr(criteria, "CRITERIA", dict(CRITERIA))
    return criteria.CRITERIA


def test_builtins_are_registered():
    assert {"magnitude", "random"} <= set(CRITERIA)
    assert get_criterion("magnitude") is CRITERIA["magnitude"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_magnitude_ranks_by_absolute_value(dtype):
    w = torch.tensor([[-3.0, 0.5], [2.0, -0.25]], dtype=dtype)
    scores = get_criterion("magnitude")(w, CriterionContext("w", step=0, seed=0, state={}))
    assert scores.shape == w.shape
    assert torch.equal(scores, w.abs())


def test_random_scores_depend_only_on_seed_step_and_name(monkeypatch):
    rand = get_criterion("random")
    w = torch.zeros(5, 7)
    a = rand(w, CriterionContext("fc.weight", step=3, seed=1, state={}))
    assert a.shape == w.shape and a.dtype.is_floating_point
    assert torch.all((a >= 0) & (a < 1))
    torch.manual_seed(123)  # the global RNG, advanced differently on each rank, has no say
    torch.rand(10)
    assert torch.equal(a, rand(w.normal_(), CriterionContext("fc.weight", step=3, seed=1)))
    # Python's str hash() differs between processes (ranks, resumes): it must not be the source.
    monkeypatch.setattr(builtins, "hash", lambda value: 0)
    assert torch.equal(a, rand(w, CriterionContext("fc.weight", step=3, seed=1)))


@pytest.mark.parametrize(
    "other",
    [
        CriterionContext("fc.weight", step=4, seed=1),
        CriterionContext("fc.bias", step=3, seed=1),
        CriterionContext("fc.weight", step=3, seed=2),
    ],
)
def test_random_scores_change_with_step_name_and_seed(other):
    rand = get_criterion("random")
    w = torch.zeros(50)
    a = rand(w, CriterionContext("fc.weight", step=3, seed=1))
    assert not torch.equal(a, rand(w, other))


def test_register_and_look_up_a_criterion(registry):
    @register_criterion("flip_test")
    def flips(weight, ctx):
        return weight.square() / (ctx.state["flips"] + 1)

    assert get_criterion("flip_test") is flips
    ctx = CriterionContext("w", step=0, seed=0, state={"flips": torch.tensor([0.0, 3.0])})
    assert get_criterion("flip_test")(torch.tensor([2.0, 2.0]), ctx).tolist() == [4.0, 1.0]


def test_duplicate_names_need_override(registry):
    with pytest.raises(ValueError, match="`name` 'magnitude' is already a registered criterion"):
        register_criterion("magnitude")(lambda w, ctx: w)
    assert registry["magnitude"] is CRITERIA["magnitude"]

    def replacement(w, ctx):
        return -w.abs()

    register_criterion("magnitude", override=True)(replacement)
    assert get_criterion("magnitude") is replacement


def test_unknown_name_lists_the_registered_ones(registry):
    register_criterion("aaa_first")(lambda w, ctx: w)
    with pytest.raises(ValueError) as info:
        get_criterion("nope")
    assert str(info.value) == f"`criterion` must be one of {sorted(registry)}, got 'nope'"
    assert str(info.value).index("'aaa_first'") < str(info.value).index("'magnitude'")
