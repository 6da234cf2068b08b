import pytest
from torch import nn

from lightning_compress.targets import match_overrides, name_matches, resolve_weights


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc10 = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.att = nn.MultiheadAttention(8, 2)
        self.conv = nn.Conv2d(1, 2, 3)
        self.emb = nn.Embedding(5, 4)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("net.fc1", "fc1", True),
        ("net.fc10", "fc1", False),
        ("net.fc1.weight", "net.fc1.weight", True),
        ("net.fc1", "*.fc*", True),
        ("fc1", "fc*", True),
        ("encoder.layers.0.linear1", "layers.0.linear1", True),
    ],
)
def test_name_matches(name, pattern, expected):
    assert name_matches(name, pattern) is expected


def test_default_targets_cover_linear_conv_and_attention():
    assert resolve_weights(Net(), None, None) == [
        "fc1.weight",
        "fc10.weight",
        "att.in_proj_weight",
        "att.out_proj.weight",
        "conv.weight",
    ]


def test_module_patterns_select_weights_not_biases():
    assert resolve_weights(Net(), ["fc*"], None) == ["fc1.weight", "fc10.weight"]
    assert resolve_weights(Net(), ["att"], None) == ["att.in_proj_weight", "att.out_proj.weight"]
    assert resolve_weights(Net(), ["emb"], None) == ["emb.weight"]  # any 2-D weight on request
    assert resolve_weights(Net(), None, ["att", "conv"]) == ["fc1.weight", "fc10.weight"]


@pytest.mark.parametrize(
    ("include", "exclude", "match"),
    [
        (["bn"], None, "'bn' .*BatchNorm1d.*no weight"),
        (["fc1.bias"], None, "'fc1.bias'.*not a weight"),
        (["nothing"], None, "matches no module or parameter"),
        (None, ["nothing"], "`exclude` pattern 'nothing' matches none"),
        (["fc1"], ["fc1"], "no weights left"),
        ([""], None, "`include` must be a pattern"),
    ],
)
def test_bad_patterns(include, exclude, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(Net(), include, exclude, owner="X")


def test_overrides_first_match_wins_and_unmatched_raise():
    names = ["net.fc1.weight", "net.fc2.weight"]
    assert match_overrides(names, {"fc1": 0.5, "net": 0.1}, "overrides", "X") == {
        "net.fc1.weight": 0.5,
        "net.fc2.weight": 0.1,
    }
    with pytest.raises(ValueError, match="`overrides` pattern 'fc3' matches none"):
        match_overrides(names, {"fc3": 0.5}, "overrides", "X")
