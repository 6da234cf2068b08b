import pytest
import torch
from torch import nn

from lightning_compress.layout import (
    STANDARD,
    TRANSPOSED,
    WeightLayout,
    layout_for_name,
    layout_of,
    register_layout,
)
from lightning_compress.targets import name_matches, resolve_targets

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def test_conv1d_weight_is_in_by_out_and_its_matrix_is_out_by_reduction():
    layer = Conv1D(nf=6, nx=4)  # 4 inputs, 6 outputs, weight (4, 6)
    layout = layout_of(layer)
    assert layout == TRANSPOSED
    matrix = layout.matrix(layer.weight)
    assert matrix.shape == (6, 4)
    x = torch.randn(3, 4)
    assert torch.allclose(layer(x), x @ matrix.t() + layer.bias, atol=1e-6)
    assert layout.out_features(layer.weight) == 6 and layout.in_features(layer.weight) == 4


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (layout, shape)
        for layout in (STANDARD, TRANSPOSED, WeightLayout(0, 2), WeightLayout(2, 0))
        for shape in ((6, 4), (6, 4, 3), (5, 6, 3, 2))
        if max(layout.out_axis, layout.in_axis) < len(shape)
    ],
)
def test_from_matrix_inverts_matrix(layout, shape):
    w = torch.randn(shape)
    m = layout.matrix(w)
    assert m.shape == (shape[layout.out_axis], w.numel() // shape[layout.out_axis])
    assert torch.equal(layout.from_matrix(m, shape), w)
    # Row i of the matrix is output channel i.
    assert torch.equal(m[1].sort().values, w.select(layout.out_axis, 1).reshape(-1).sort().values)


def test_per_channel_broadcasts_along_the_output_axis():
    w = torch.ones(4, 6)  # Conv1D-style (in, out)
    scaled = w * TRANSPOSED.per_channel(torch.arange(6.0), w.dim())
    assert torch.equal(scaled[0], torch.arange(6.0))


def test_conv_reduction_keeps_input_channels_outermost():
    w = torch.randn(8, 3, 2, 2)
    m = STANDARD.matrix(w)
    assert torch.equal(m, w.reshape(8, -1))


def test_a_user_layer_is_one_registration():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(5, 7))  # (in, out)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = Transposed()
            self.fc = nn.Linear(7, 2)

    assert resolve_targets(Net(), None, None).names == ["fc.weight"]
    register_layout(Transposed, "kernel", TRANSPOSED)
    try:
        assert resolve_targets(Net(), None, None).names == ["t.kernel", "fc.weight"]
        assert layout_for_name(Net(), "t.kernel") == TRANSPOSED
    finally:
        from lightning_compress import layout as layout_module

        del layout_module._LAYOUTS[Transposed, "kernel"]


def test_invalid_layout_names_the_axes():
    with pytest.raises(ValueError, match="distinct non-negative"):
        WeightLayout(1, 1)


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_default_targets_every_conv1d_and_leaves_the_tied_head_out_with_a_reason():
    model = _gpt2()
    targeting = resolve_targets(model, None, None, "PruneCallback")
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert targeting.names == [f"{n}.weight" for n in conv1d]
    head = next(r for r in targeting.rows if r["name"] == "lm_head.weight")
    assert not head["targeted"] and "tied to transformer.wte.weight" in head["why"]
    assert "lm_head.weight" in targeting.table()


def test_a_tied_head_named_in_include_is_one_target_under_its_canonical_name():
    model = _gpt2()
    targeting = resolve_targets(model, ["lm_head"], None, "X")
    assert targeting.names == ["transformer.wte.weight"]
    row = next(r for r in targeting.rows if r["targeted"])
    assert "shared with lm_head.weight" in row["why"]
    params = dict(model.named_parameters())
    assert all(n in params for n in targeting.names)


def test_anchored_pattern_names_only_the_root_layer():
    assert name_matches("conv1", "^conv1")
    assert not name_matches("layer1.0.conv1", "^conv1")
    assert name_matches("layer1.0.conv1", "conv1")
    assert name_matches("model.conv1", "^model.conv*")
