import pytest

from lightning_compress.clock import Step, parse_step, resolve_steps, steps_per_epoch


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, Step(0, "it")),
        (500, Step(500, "it")),
        ("0", Step(0, "it")),
        ("12", Step(12, "it")),
        ("10ep", Step(10, "ep")),
        ("500it", Step(500, "it")),
        (" 7 it ", Step(7, "it")),
        ("\t3ep\n", Step(3, "ep")),
        (Step(2, "ep"), Step(2, "ep")),
    ],
)
def test_parse_step_accepts_ints_and_unit_strings(value, expected):
    assert parse_step(value, "start") == expected


@pytest.mark.parametrize(
    "value", [-1, "-3it", "ten", "5 epochs", "1.5ep", "ep", "", "3ep4", None, True, 2.0]
)
def test_parse_step_rejects_naming_the_argument_the_value_and_the_forms(value):
    with pytest.raises(ValueError, match="`end` must be a non-negative int") as info:
        parse_step(value, "end")
    message = str(info.value)
    assert "'10ep'" in message and "'500it'" in message
    assert message.endswith(f"got {value!r}")


def test_to_steps_converts_epochs_only():
    assert Step(3, "ep").to_steps(55) == 165
    assert Step(0, "ep").to_steps(55) == 0
    assert Step(40, "it").to_steps(55) == 40


@pytest.mark.parametrize("step", [Step(10, "ep"), Step(500, "it"), Step(0, "it")])
def test_str_round_trips_through_parse_step(step):
    assert str(step) == f"{step.value}{step.unit}"
    assert parse_step(str(step), "every") == step


class _Trainer:
    """The two attributes of a Trainer the clock reads."""

    def __init__(self, batches: float, accumulate: int = 1) -> None:
        self.num_training_batches = batches
        self.accumulate_grad_batches = accumulate


@pytest.mark.parametrize(
    ("batches", "accumulate", "expected"),
    [(10, 1, 10), (10, 3, 4), (9, 3, 3), (1, 8, 1), (float("inf"), 1, 0)],
)
def test_steps_per_epoch_counts_optimizer_steps_including_the_last_partial_one(
    batches, accumulate, expected
):
    assert steps_per_epoch(_Trainer(batches, accumulate)) == expected


def test_resolve_steps_converts_epochs_and_keeps_none():
    steps = resolve_steps(_Trainer(10, 3), start=Step(2, "ep"), end=Step(7, "it"), freeze=None)
    assert steps == {"start": 8, "end": 7, "freeze": None}


def test_epoch_steps_without_an_epoch_length_name_the_argument():
    with pytest.raises(ValueError, match=r"`end`=3ep is in epochs.*'500it'"):
        resolve_steps(_Trainer(float("inf")), end=Step(3, "ep"))
    assert resolve_steps(_Trainer(float("inf")), end=Step(3, "it")) == {"end": 3}
