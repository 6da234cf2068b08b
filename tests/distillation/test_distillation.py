import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.distillation import (
    TeacherMemo,
    agreement,
    example_fingerprints,
    kd_loss,
    logits_of,
    make_adapter,
)


def test_kd_loss_is_t_squared_kl_of_softened_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    temp = 3.0
    p = F.softmax(t / temp, 1)
    q = F.softmax(s / temp, 1)
    expected = temp**2 * (p * (p.log() - q.log())).sum(1).mean()
    assert kd_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_matches_hintons_formula():
    # d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) / batch (Hinton et al. 2015, eq. 2).
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    temp = 2.0
    kd_loss(s, t, temp).backward()
    expected = temp * (F.softmax(s / temp, 1) - F.softmax(t / temp, 1)) / 4
    assert torch.allclose(s.grad, expected.detach(), atol=1e-6)


def test_class_dim_treats_every_position_as_an_example():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    rows = kd_loss(s.permute(0, 2, 3, 1).reshape(-1, 4), t.permute(0, 2, 3, 1).reshape(-1, 4), 2.0)
    assert kd_loss(s, t, 2.0, class_dim=1).item() == pytest.approx(rows.item(), rel=1e-6)
    assert agreement(s, s, class_dim=1).item() == 1.0


def test_logits_are_found_in_common_output_types():
    x = torch.randn(2, 3)

    class Out:
        logits = x

    for output in (x, {"logits": x}, Out(), (x, "aux"), [x]):
        assert logits_of(output, "forward") is x
    with pytest.raises(TypeError, match="forward returned str"):
        logits_of("nope", "forward")


def test_fingerprints_depend_on_the_example_not_the_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 4, generator=g)
    ids = torch.arange(8)
    keys = example_fingerprints((x,), {"ids": ids, "flag": True}, 8)
    perm = torch.tensor([3, 1, 7, 0])
    subset = example_fingerprints((x[perm],), {"ids": ids[perm], "flag": True}, 4)
    assert subset == [keys[i] for i in perm.tolist()]
    assert len(set(keys)) == 8
    other_flag = example_fingerprints((x,), {"ids": ids, "flag": False}, 8)
    assert not set(other_flag) & set(keys)
    nudged = x.clone()
    nudged[2, 1, 1] = torch.nextafter(nudged[2, 1, 1], torch.tensor(math.inf))
    changed = example_fingerprints((nudged,), {"ids": ids, "flag": True}, 8)
    assert [a == b for a, b in zip(changed, keys, strict=True)] == [i != 2 for i in range(8)]
    negated = x.clone()
    negated[5, 0, :2] = -negated[5, 0, :2]  # two sign flips
    assert example_fingerprints((negated,), {"ids": ids, "flag": True}, 8)[5] != keys[5]


def test_memo_returns_rows_in_request_order_and_respects_its_limit():
    memo = TeacherMemo(limit=5)
    keys = [(0, i, i) for i in range(4)]
    out = {"logits": torch.arange(8.0).view(4, 2)}
    memo.insert(keys, out)
    assert memo.lookup([keys[2], keys[0]])["logits"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert memo.lookup([keys[1], (0, 9, 9)]) is None
    memo.insert([(0, 9, 9), (0, 10, 10)], {"logits": torch.ones(2, 2)})
    assert len(memo) == 5  # the limit
    assert memo.lookup([(0, 10, 10)]) is None
    other = TeacherMemo()
    other.insert(keys, out)
    with pytest.raises(ValueError, match="changed shape"):
        other.insert([(1, 1, 1)], {"logits": torch.ones(1, 3)})


def test_memo_grows_past_its_first_allocation():
    memo = TeacherMemo()
    for start in range(0, 300, 50):
        keys = [(0, i, i) for i in range(start, start + 50)]
        memo.insert(keys, {"logits": torch.arange(start, start + 50.0).view(50, 1)})
    got = memo.lookup([(0, 299, 299), (0, 0, 0), (0, 123, 123)])
    assert got["logits"].view(-1).tolist() == [299.0, 0.0, 123.0]


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((8, 32), (8, 48), nn.Linear),
        ((8, 10, 16), (8, 10, 24), nn.Linear),
        ((8, 16, 10), (8, 24, 10), nn.Conv1d),
        ((8, 4, 7, 7), (8, 12, 7, 7), nn.Conv2d),
    ],
)
def test_adapters_map_student_features_to_the_teachers_shape(student, teacher, kind):
    adapter = make_adapter(torch.Size(student), torch.Size(teacher), "f", seed=0)
    assert isinstance(adapter, kind)
    assert adapter(torch.randn(student)).shape == teacher
    state = torch.random.get_rng_state()
    again = make_adapter(torch.Size(student), torch.Size(teacher), "f", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(again.weight, adapter.weight)  # same seed, same adapter on every rank


def test_equal_shapes_need_no_adapter_and_others_are_refused():
    assert make_adapter(torch.Size((2, 3)), torch.Size((2, 3)), "f", seed=0) is None
    for student, teacher in [((8, 32), (8, 3, 30)), ((8, 4, 7, 7), (8, 4, 5, 5)), ((8, 3), (4, 3))]:
        with pytest.raises(ValueError, match=r"cannot be adapted|differ in dimension"):
            make_adapter(torch.Size(student), torch.Size(teacher), "f", seed=0)
