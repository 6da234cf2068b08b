import pytest
import torch

from lightning_compress import ops
from lightning_compress.ops.flips import flip_count_reference, masked_noise_reference


def _case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    before = torch.randn(shape, generator=g)
    before[torch.rand(shape, generator=g) < 0.2] = 0.0
    after = before + 0.8 * torch.randn(shape, generator=g)
    after[torch.rand(shape, generator=g) < 0.2] = 0.0
    after[torch.rand(shape, generator=g) < 0.05] = -0.0
    sign = torch.sign(before).to(torch.int8)
    flips = torch.randint(0, 5, shape, generator=g, dtype=torch.int32)
    return after.to(dtype), sign, flips


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (300, 784), (2, 3, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_compiled_matches_reference(shape, dtype, device):
    param, sign, flips = _case(shape, dtype)
    sign_ref, flips_ref = sign.clone(), flips.clone()
    flip_count_reference(param, sign_ref, flips_ref)
    sign, flips = sign.to(device), flips.to(device)
    ops.flip_count_(param.to(device), sign, flips)
    assert torch.equal(sign.cpu(), sign_ref)
    assert torch.equal(flips.cpu(), flips_ref)


def test_counts_strict_sign_changes_only():
    param = torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0, -3.0])
    sign = torch.tensor([-1, 1, 1, -1, 1, 0], dtype=torch.int8)
    flips = torch.zeros(6, dtype=torch.int32)
    ops.flip_count_(param, sign, flips)
    assert flips.tolist() == [1, 1, 0, 0, 0, 0]
    assert sign.tolist() == [1, -1, 0, 0, 1, -1]


def test_non_contiguous_weights():
    param, sign, flips = _case((40, 30), torch.float32)
    sign_t, flips_t = sign.t().contiguous(), flips.t().contiguous()
    expected_sign, expected_flips = sign_t.clone(), flips_t.clone()
    flip_count_reference(param.t(), expected_sign, expected_flips)
    ops.flip_count_(param.t(), sign_t, flips_t)
    assert torch.equal(flips_t, expected_flips) and torch.equal(sign_t, expected_sign)


def test_opcheck(device):
    args = tuple(t.to(device) for t in _case((37,), torch.float32))
    torch.library.opcheck(torch.ops.lightning_compress.flip_count_.default, args)


@pytest.mark.parametrize(
    ("sign_dtype", "flips_dtype"), [(torch.int32, torch.int32), (torch.int8, torch.int64)]
)
def test_wrong_dtypes_are_rejected(sign_dtype, flips_dtype):
    with pytest.raises((RuntimeError, TypeError), match=r"must be int(8|32)"):
        ops.flip_count_(
            torch.ones(3), torch.zeros(3, dtype=sign_dtype), torch.zeros(3, dtype=flips_dtype)
        )


@pytest.mark.parametrize("shape", [(0,), (5,), (300, 784), (70000,)])
@pytest.mark.parametrize("masked", [True, False])
def test_masked_noise_matches_reference(shape, masked, device):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(shape, generator=g)
    keep = (torch.rand(shape, generator=g) < 0.6).float() if masked else None
    noise = torch.randn(shape, generator=g)
    expected = grad.clone()
    masked_noise_reference(expected, keep, noise, 0.7)
    grad = grad.to(device)
    ops.masked_noise_(grad, None if keep is None else keep.to(device), noise.to(device), 0.7)
    grad = grad.cpu()
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-6)
    if masked and grad.numel():
        assert torch.all(grad[keep == 0] == 0)


def test_masked_noise_scale_is_the_gradient_rms():
    grad = torch.full((1000,), 2.0)
    keep = torch.ones(1000)
    keep[:500] = 0
    noise = torch.ones(1000)
    ops.masked_noise_(grad, keep, noise, 0.5)
    rms = (500 * 4.0 / 1000) ** 0.5  # of the masked gradient, over all n entries
    assert torch.allclose(grad[500:], torch.full((500,), 2.0 + 0.5 * rms))
    assert torch.all(grad[:500] == 0)


def test_masked_noise_opcheck(device):
    grad, noise = torch.randn(37, device=device), torch.randn(37, device=device)
    keep = (torch.rand(37, device=device) < 0.5).float()
    torch.library.opcheck(
        torch.ops.lightning_compress.masked_noise_.default, (grad, keep, noise, 1.0)
    )
    torch.library.opcheck(
        torch.ops.lightning_compress.masked_noise_.default, (grad, None, noise, 1.0)
    )


def test_masked_noise_rejects_mismatched_inputs():
    with pytest.raises((RuntimeError, ValueError), match="must match"):
        ops.masked_noise_(torch.zeros(4), None, torch.zeros(5), 1.0)
