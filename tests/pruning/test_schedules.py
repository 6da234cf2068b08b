import itertools
import math

import pytest

from lightning_compress.pruning import Schedule, Step, parse_step


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, Step(0, "it")),
        (500, Step(500, "it")),
        ("10ep", Step(10, "ep")),
        (" 7it ", Step(7, "it")),
        ("12", Step(12, "it")),
    ],
)
def test_parse_step(value, expected):
    assert parse_step(value, "start") == expected


@pytest.mark.parametrize("value", [-1, "ten", "5 epochs", "1.5ep", "-3it", None, True])
def test_parse_step_rejects(value):
    with pytest.raises(ValueError, match="`start`"):
        parse_step(value, "start")


def test_step_conversion():
    assert Step(3, "ep").to_steps(55) == 165
    assert Step(40, "it").to_steps(55) == 40
    assert str(Step(3, "ep")) == "3ep"


def test_cubic_follows_zhu_and_gupta_at_events():
    s = Schedule("cubic", final=0.9, start=100, end=1100, every=100, initial=0.1)
    assert s.events() == list(range(100, 1101, 100))
    for t in s.events():
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert math.isclose(s.value_at(t), expected, abs_tol=1e-12)
        assert s.is_event(t)
    assert s.value_at(1100) == 0.9
    assert s.value_at(5000) == 0.9
    assert s.value_at(99) == 0.0
    # Between events the value of the last event holds.
    assert s.value_at(150) == s.value_at(100)
    assert not s.is_event(150)


@pytest.mark.parametrize("kind", ["linear", "cubic"])
def test_off_grid_end_is_the_last_event(kind):
    s = Schedule(kind, final=0.8, start=0, end=10, every=4)
    assert s.events() == [0, 4, 8, 10]
    assert [s.is_event(t) for t in range(12)] == [t in (0, 4, 8, 10) for t in range(12)]
    assert s.value_at(10) == 0.8
    values = [s.value_at(t) for t in range(12)]
    assert values == sorted(values)


def test_value_is_a_pure_function_of_the_step():
    s = Schedule("cubic", final=0.95, start=3, end=77, every=5)
    forward = [s.value_at(t) for t in range(100)]
    backward = [s.value_at(t) for t in reversed(range(100))][::-1]
    assert forward == backward


def test_iterative_prunes_a_rate_of_what_remains_until_final():
    s = Schedule("iterative", final=0.9, start=10, end=10, every=5, rate=0.2)
    events = s.events()
    assert events[0] == 10 and all(b - a == 5 for a, b in itertools.pairwise(events))
    for k, t in enumerate(events[:-1], start=1):
        assert math.isclose(s.value_at(t), 1 - 0.8**k, abs_tol=1e-12)
    assert s.value_at(events[-1]) == 0.9
    assert len(events) == math.ceil(math.log(0.1) / math.log(0.8))
    assert 1 - 0.8 ** (len(events) - 1) < 0.9


def test_oneshot_and_constant():
    one = Schedule("oneshot", final=0.5, start=20, end=20, every=1)
    assert one.events() == [20]
    assert one.value_at(19) == 0.0 and one.value_at(20) == 0.5 and one.value_at(10**6) == 0.5
    const = Schedule("constant", final=0.5, start=0, end=0, every=1)
    assert const.value_at(1000) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "exp"}, "`schedule`"),
        ({"final": 1.0}, "`sparsity`"),
        ({"start": 5, "end": 2}, "start <= end"),
        ({"every": 0}, "`every`"),
        ({"kind": "iterative", "rate": None}, "`rate`"),
        ({"initial": 0.95}, "`initial`"),
    ],
)
def test_schedule_validation(kwargs, match):
    args = {"kind": "cubic", "final": 0.9, "start": 0, "end": 10, "every": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        Schedule(**args)
