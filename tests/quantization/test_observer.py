"""Activation observers: moving-average ranges and 8-bit fake quantization."""

import pytest
import torch

from lightning_compress.quantization import ActivationObserver, ActivationRange


def test_first_batch_initialises_then_the_range_moves_by_momentum():
    obs = ActivationObserver(momentum=0.1)
    assert ActivationRange.from_observer(obs) is None
    x = torch.randn(100)
    assert torch.equal(obs.fake_quant(x), x)  # nothing observed: float
    obs.observe(-1.0, 2.0)
    obs.observe(-3.0, 4.0)
    assert float(obs.min) == pytest.approx(-1.0 + 0.1 * (-3.0 + 1.0))
    assert float(obs.max) == pytest.approx(2.0 + 0.1 * (4.0 - 2.0))


def test_the_range_contains_zero_and_outputs_take_256_levels():
    obs = ActivationObserver()
    obs.update(torch.linspace(0.5, 3.0, 10))  # all positive: widened to contain 0
    scale, zero_point = obs.qparams()
    assert zero_point == 0 and scale == 3.0 / 255
    out = obs.fake_quant(torch.linspace(-1, 4, 1000))
    assert len(torch.unique(out)) <= 256 and float(out.min()) == 0.0
    assert obs.fake_quant(torch.zeros(3)).eq(0).all()  # 0 is exact
    act = ActivationRange.from_observer(obs)
    assert act == ActivationRange(scale, zero_point, 8) and act.qmax == 255


def test_state_round_trip():
    obs = ActivationObserver()
    obs.observe(-0.5, 1.5)
    again = ActivationObserver()
    again.load_state_dict(obs.state_dict())
    assert again.initialized and again.qparams() == obs.qparams()
