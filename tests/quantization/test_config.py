"""QATConfig: every QATCallback argument, validated once."""

import pytest

from lightning_compress.clock import Step
from lightning_compress.quantization import QATConfig


def test_defaults_and_normalized_values():
    config = QATConfig()
    assert config.bits == 8 and config.start == Step(0, "ep") and config.activations == 8
    assert config.overrides == {} and config.freeze_observers is None
    config = QATConfig(start=5, activations=0, freeze_bn="1ep", overrides={"fc3": 8})
    assert config.start == Step(5, "it") and config.activations is None
    assert config.freeze_bn == Step(1, "ep") and config.overrides == {"fc3": 8}
    assert config.state_key_fields() == {"bits": 8, "include": None, "exclude": None}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1}, r"`bits` must be an integer in \[2, 8\], got 1"),
        ({"bits": 9}, r"`bits` must be an integer in \[2, 8\], got 9"),
        ({"bits": 4.0}, r"`bits` must be an integer in \[2, 8\], got 4.0"),
        ({"overrides": {"fc3": 16}}, r"`overrides\['fc3'\]` must be an integer in \[2, 8\]"),
        ({"activations": 4}, "`activations` must be 8 or None"),
        ({"method": "sgd"}, r"`method` must be one of \(.ste., .lsq.\), got .sgd."),
        ({"lsq_lr": 0}, "`lsq_lr` must be > 0"),
        ({"start": "soon"}, "`start` must be a non-negative int"),
        ({"freeze_bn": -1}, "`freeze_bn` must be a non-negative int"),
        ({"start": "2ep", "freeze_observers": "1ep"}, "`freeze_observers`=1ep is before"),
        ({"start": "2ep", "freeze_bn": "1ep"}, "`freeze_bn`=1ep is before"),
    ],
)
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kwargs)


def test_from_mapping_names_unknown_options():
    assert QATConfig.from_mapping({"bits": 4}).bits == 4
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bit'\]"):
        QATConfig.from_mapping({"bit": 4})
