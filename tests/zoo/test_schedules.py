import math

import pytest
import torch

from lightning_compress.zoo.schedules import cosine_then_constant


def _lrs(scheduler, optimizer, n):
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_over_t_max_then_a_tenth():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    lrs = _lrs(cosine_then_constant(opt, T_max=4, factor=0.1), opt, 7)
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)] + [0.05] * 3
    assert lrs == pytest.approx(expected)


def test_state_round_trip_resumes_the_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_then_constant(opt, T_max=3)
    _lrs(sched, opt, 2)
    state = torch.load(_save(sched.state_dict()), weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = cosine_then_constant(opt2, T_max=3)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert _lrs(sched2, opt2, 3) == pytest.approx(_lrs(sched, opt, 3))


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"T_max": 0}, "`T_max`"), ({"T_max": 2, "factor": 0}, "`factor`")]
)
def test_bad_arguments(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        cosine_then_constant(opt, **kwargs)
