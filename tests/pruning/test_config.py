"""PruneConfig: validated once, without a Trainer; the state key its callback builds from it."""

import dataclasses

import pytest

from lightning_compress import PruneCallback
from lightning_compress.clock import Step
from lightning_compress.pruning import PruneConfig


def test_defaults_and_normalised_values():
    config = PruneConfig()
    assert config.sparsity == 0.9
    assert (config.start, config.end, config.every) == (
        Step(0, "ep"),
        Step(10, "ep"),
        Step(1, "ep"),
    )
    assert config.overrides == {} and config.rates == {}
    assert config.nm is None


def test_nm_implies_the_sparsity():
    assert PruneConfig(structure="2:4").sparsity == 0.5
    assert PruneConfig(structure="1:4", sparsity=0.75).nm == (1, 4)
    with pytest.raises(ValueError, match="contradicts `structure`='2:4'"):
        PruneConfig(structure="2:4", sparsity=0.9)


def test_steps_are_parsed_and_mixed_units_left_to_the_plan():
    config = PruneConfig(start=3, end="2ep", every="5it")
    assert (config.start, config.end, config.every) == (Step(3, "it"), Step(2, "ep"), Step(5, "it"))


def test_flipout_needs_steps_before_its_first_event():
    with pytest.raises(ValueError, match=r"needs optimizer steps .* got `start`=0ep"):
        PruneConfig(criterion="flipout", start="0ep")
    assert PruneConfig(criterion="flipout", start="1it").start == Step(1, "it")


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PruneConfig().sparsity = 0.5  # type: ignore[misc]


def test_from_mapping_names_unknown_options():
    assert PruneConfig.from_mapping({"sparsity": 0.5}).sparsity == 0.5
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sparsty'\]"):
        PruneConfig.from_mapping({"sparsty": 0.5})


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (
            {"sparsity": 0.5, "schedule": "oneshot", "include": ["fc1"]},
            "PruneCallback{'sparsity': 0.5, 'schedule': 'oneshot', 'structure': 'unstructured', "
            "'include': ['fc1'], 'exclude': None}",
        ),
        (
            {"structure": "2:4", "include": "fc1", "exclude": ("fc1.bias",)},
            "PruneCallback{'sparsity': 0.5, 'schedule': 'cubic', 'structure': '2:4', "
            "'include': 'fc1', 'exclude': ('fc1.bias',)}",
        ),
        (
            {},
            "PruneCallback{'sparsity': 0.9, 'schedule': 'cubic', 'structure': 'unstructured', "
            "'include': None, 'exclude': None}",
        ),
    ],
)
def test_state_key_is_byte_identical_to_the_one_old_checkpoints_hold(kwargs, key):
    """The key before PruneConfig: the arguments as given (a list stays a list)."""
    assert PruneCallback(**kwargs).state_key == key


def test_callback_reads_its_settings_from_the_config():
    prune = PruneCallback(sparsity=0.5, schedule="iterative", rate=0.2, start="1ep")
    assert prune.sparsity == 0.5 and prune.rate == 0.2 and prune.start == Step(1, "ep")
    assert prune.config == PruneConfig(sparsity=0.5, schedule="iterative", rate=0.2, start="1ep")


@pytest.mark.parametrize("value", [-0.01, 1.0, 1.5])
def test_min_density_is_a_fraction(value):
    with pytest.raises(ValueError, match=rf"`min_density` must be in \[0, 1\), got {value}"):
        PruneConfig(min_density=value)


def test_min_density_is_not_part_of_the_state_key():
    assert PruneCallback(min_density=0.1).state_key == PruneCallback(min_density=0.0).state_key
