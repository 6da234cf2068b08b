import itertools
import math
import random

import pytest

from lightning_compress.pruning import SCHEDULES, Schedule

# One of each kind, with off-grid ends and a non-zero start where it matters.
SCHEDULE_CASES = [
    Schedule("oneshot", final=0.5, start=20, end=20, every=1),
    Schedule("linear", final=0.8, start=3, end=41, every=5),
    Schedule("cubic", final=0.95, start=0, end=100, every=10, initial=0.1),
    Schedule("cubic", final=0.9, start=7, end=7, every=3),
    Schedule("iterative", final=0.9, start=10, end=10, every=6, rate=0.2),
    Schedule("constant", final=0.5, start=4, end=4, every=1, initial=0.3),
]


def test_schedule_names():
    assert set(SCHEDULES) == {"oneshot", "linear", "cubic", "iterative", "constant"}


def test_cubic_follows_zhu_and_gupta_at_events():
    s = Schedule("cubic", final=0.9, start=100, end=1100, every=100, initial=0.1)
    assert s.events() == list(range(100, 1101, 100))
    for t in s.events():
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert math.isclose(s.value_at(t), expected, rel_tol=0, abs_tol=1e-12)
    assert s.value_at(100) == 0.1
    assert s.value_at(1100) == 0.9
    assert s.value_at(10**9) == 0.9
    # Between events the value of the last event holds.
    assert s.value_at(150) == s.value_at(100)
    assert s.value_at(1099) == s.value_at(1000) < 0.9


def test_linear_interpolates_at_events():
    s = Schedule("linear", final=0.6, start=10, end=50, every=10, initial=0.2)
    for t in s.events():
        assert math.isclose(s.value_at(t), 0.2 + 0.4 * (t - 10) / 40, rel_tol=0, abs_tol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cubic"])
def test_off_grid_end_is_the_last_event(kind):
    s = Schedule(kind, final=0.8, start=0, end=10, every=4)
    assert s.events() == [0, 4, 8, 10]
    assert s.value_at(9) < s.value_at(10) == 0.8


@pytest.mark.parametrize("kind", ["linear", "cubic"])
def test_a_ramp_with_end_equal_to_start_is_a_one_shot(kind):
    s = Schedule(kind, final=0.7, start=5, end=5, every=2)
    assert s.events() == [5]
    assert (s.value_at(4), s.value_at(5), s.value_at(100)) == (0.0, 0.7, 0.7)


@pytest.mark.parametrize("kind", ["linear", "cubic"])
@pytest.mark.parametrize("seed", range(20))
def test_ramps_end_exactly_on_final(kind, seed):
    rng = random.Random(seed)
    final = rng.random() * 0.999
    start = rng.randrange(100)
    s = Schedule(kind, final, start, start + rng.randrange(1, 500), rng.randrange(1, 50))
    assert s.value_at(s.end) == final
    assert s.events()[-1] == s.end


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=lambda s: s.kind)
def test_events_round_index_and_is_event_agree(schedule):
    events = schedule.events()
    assert events == sorted(set(events))
    assert events[0] == schedule.start
    for t in range(events[-1] + 20):
        assert schedule.is_event(t) == (t in events)
        assert schedule.round_index(t) == sum(e <= t for e in events)


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=lambda s: s.kind)
def test_value_is_monotone_and_changes_only_at_events(schedule):
    values = [schedule.value_at(t) for t in range(schedule.events()[-1] + 20)]
    assert values == sorted(values)
    assert values[0] == schedule.initial
    for t, (before, after) in enumerate(itertools.pairwise(values), start=1):
        assert before == after or schedule.is_event(t)
    if schedule.kind != "constant":
        assert values[-1] == schedule.final


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=lambda s: s.kind)
def test_value_is_a_pure_function_of_the_step(schedule):
    steps = list(range(150))
    forward = {t: schedule.value_at(t) for t in steps}
    random.Random(0).shuffle(steps)
    assert {t: schedule.value_at(t) for t in steps} == forward
    assert {t: schedule.value_at(t) for t in reversed(steps)} == forward


def test_queries_are_constant_time_on_huge_schedules():
    s = Schedule("cubic", final=0.9, start=0, end=10**15, every=1)
    assert s.is_event(10**15 - 1)
    assert s.round_index(10**15 - 1) == 10**15
    assert s.value_at(5 * 10**14) == pytest.approx(0.9 * (1 - 0.5**3))
    assert s.value_at(10**15) == 0.9


@pytest.mark.parametrize(
    ("rate", "rounds", "initial"),
    [(0.2, 10, 0.0), (0.2, 2, 0.0), (0.1, 4, 0.0), (0.5, 3, 0.0), (0.5, 5, 0.0), (0.2, 3, 0.5)],
)
def test_iterative_prunes_rate_of_what_remains_until_final(rate, rounds, initial):
    # final = 1 - (1 - initial)(1 - rate)^rounds: some of these make log(1 - final) / log(1 - rate)
    # come out a hair above `rounds`, which must not add a near-empty round.
    final = 1 - (1 - initial) * (1 - rate) ** rounds
    s = Schedule("iterative", final=final, start=10, end=10, every=5, rate=rate, initial=initial)
    assert s.events() == [10 + 5 * k for k in range(rounds)]
    for k, t in enumerate(s.events(), start=1):
        assert s.round_index(t) == k
        expected = 1 - (1 - initial) * (1 - rate) ** k
        assert math.isclose(s.value_at(t), expected, rel_tol=0, abs_tol=1e-12)
    assert s.value_at(s.events()[-1]) == final


def test_iterative_caps_the_last_round_at_final():
    s = Schedule("iterative", final=0.9, start=0, end=0, every=5, rate=0.2)
    events = s.events()
    assert len(events) == math.ceil(math.log(0.1) / math.log(0.8))
    assert s.value_at(events[-2]) == pytest.approx(1 - 0.8 ** (len(events) - 1))
    assert s.value_at(events[-2]) < 0.9
    assert s.value_at(events[-1]) == 0.9
    assert s.value_at(10**6) == 0.9
    assert not s.is_event(events[-1] + 5)


def test_iterative_does_not_use_end():
    unlimited = Schedule("iterative", final=0.9, start=3, end=3, every=5, rate=0.2)
    ended = Schedule("iterative", final=0.9, start=3, end=20, every=5, rate=0.2)
    assert ended.events() == unlimited.events()
    assert [ended.value_at(t) for t in range(80)] == [unlimited.value_at(t) for t in range(80)]


def test_iterative_already_at_final_has_no_events():
    s = Schedule("iterative", final=0.5, start=0, end=0, every=1, rate=0.2, initial=0.5)
    assert s.events() == []
    assert not s.is_event(0)
    assert s.value_at(100) == 0.5


def test_oneshot_and_constant():
    one = Schedule("oneshot", final=0.5, start=20, end=20, every=1)
    assert one.events() == [20]
    assert (one.value_at(19), one.value_at(20), one.value_at(10**6)) == (0.0, 0.5, 0.5)
    const = Schedule("constant", final=0.5, start=0, end=0, every=1, initial=0.2)
    assert const.events() == [0]
    assert {const.value_at(t) for t in (0, 1, 10**6)} == {0.2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "exp"}, r"`kind` must be one of .*'cubic'.*, got 'exp'"),
        ({"final": 1.0}, r"`final` must be in \[0, 1\), got 1.0"),
        ({"final": -0.1}, r"`final` must be in \[0, 1\), got -0.1"),
        ({"initial": 0.95}, r"`initial` must be in \[0, `final`=0.9\], got 0.95"),
        ({"initial": -0.1}, r"`initial` .* got -0.1"),
        ({"start": -1, "end": 10}, "`start` must be >= 0, got -1"),
        ({"start": 5, "end": 2}, "`end` must be >= `start`=5, got 2"),
        ({"every": 0}, "`every` must be >= 1 optimizer step, got 0"),
        ({"kind": "iterative"}, r"`rate` must be in \(0, 1\) for kind='iterative', got None"),
        ({"kind": "iterative", "rate": 1.0}, r"`rate` must be in \(0, 1\).*got 1.0"),
        ({"kind": "iterative", "rate": 0.0}, r"`rate` must be in \(0, 1\).*got 0.0"),
        ({"rate": 0.2}, "`rate` applies only to kind='iterative', got rate=0.2 for kind='cubic'"),
    ],
)
def test_schedule_validation(kwargs, match):
    args = {"kind": "cubic", "final": 0.9, "start": 0, "end": 10, "every": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        Schedule(**args)
