"""Activation observers: moving-average ranges and 8-bit fake quantization."""

import pytest
import torch

from lightning_compress.quantization import ActivationObserver, ActivationRange


def test_first_batch_initialises_then_the_range_widens_at_once_and_narrows_by_momentum():
    obs = ActivationObserver(momentum=0.1)
    assert ActivationRange.from_observer(obs) is None
    x = torch.randn(100)
    assert torch.equal(obs.fake_quant(x), x)  # nothing observed: float
    obs.observe(-1.0, 2.0)
    obs.observe(-3.0, 4.0)  # wider: taken at once, so growing activations are never clipped
    assert (float(obs.min), float(obs.max)) == (-3.0, 4.0)
    obs.observe(-1.0, 2.0)  # narrower: the moving average
    assert float(obs.min) == pytest.approx(-3.0 + 0.1 * (-1.0 + 3.0))
    assert float(obs.max) == pytest.approx(4.0 + 0.1 * (2.0 - 4.0))


def test_clipped_activations_still_pass_their_gradient():
    obs = ActivationObserver()
    obs.observe(-1.0, 1.0)
    x = torch.tensor([-5.0, 0.5, 5.0], requires_grad=True)
    out = obs.fake_quant(x)
    assert float(out[2]) == pytest.approx(1.0, abs=0.01)  # clipped in the forward
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


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
