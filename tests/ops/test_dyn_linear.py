"""The dynamically quantized sparse linear ops: layouts, kernels against the reference, limits."""

import os
import subprocess
import sys

import pytest
import torch

from lightning_compress.ops.dyn_linear import (
    MAX_IN_FEATURES,
    bitmask_dyn_linear,
    bitmask_layout,
    block_dyn_linear,
    block_layout,
    check_bitmask_layout,
    check_block_layout,
    dense_from_bitmask,
    dense_from_blocks,
    dyn_linear_from_dense,
    quantize_rows,
)

OPS = {"bitmask": (bitmask_layout, bitmask_dyn_linear), "block": (block_layout, block_dyn_linear)}


def weights(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q[torch.rand(n, k, generator=g) < sparsity] = 0
    return q


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (37, 130), (64, 257), (5, 1000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_layouts_hold_the_weight(kind, shape, sparsity):
    q = weights(*shape, sparsity)
    layout = OPS[kind][0](q)
    if kind == "bitmask":
        check_bitmask_layout(*layout[:3], shape)
        assert torch.equal(dense_from_bitmask(*layout[:3], shape[1]), q)
    else:
        check_block_layout(*layout[:3], shape)
        assert torch.equal(dense_from_blocks(*layout[:3], shape[1]), q)
    assert torch.equal(layout[3], q.int().sum(dim=1).int())


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17, 33, 64, 65, 130])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_kernels_equal_the_reference(kind, batch, sparsity):
    n, k = 45, 200
    q = weights(n, k, sparsity, seed=batch)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, k, generator=g)
    x[0] = 0.0  # an all-zero row: step 1, zero point 0
    scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    layout, op = OPS[kind][0](q), OPS[kind][1]
    y = op(x, *layout, scale, bias, k)
    torch.testing.assert_close(y, dyn_linear_from_dense(x, q, scale, bias), rtol=1e-6, atol=1e-4)
    # Close to the fp32 product: within the rounding of x to 256 levels per row.
    exact = x @ (q.float() * scale[:, None]).T + bias
    step = quantize_rows(x)[1]
    bound = 0.5 * step[:, None] * (q.abs().float().sum(dim=1) * scale)[None, :] + 1e-3
    assert bool(((y - exact).abs() <= bound).all())


@pytest.mark.parametrize("kind", OPS)
def test_quantized_outputs_match_the_reference(kind):
    q = weights(30, 70, 0.5)
    x, scale = torch.randn(9, 70), torch.rand(30) * 0.01
    act = (0.05, 100, 255)
    y = OPS[kind][1](x, *OPS[kind][0](q), scale, None, 70, *act)
    ref = dyn_linear_from_dense(x, q, scale, None, *act)
    assert torch.equal(y, ref) or (y - ref).abs().max() <= 0.05 + 1e-6


@pytest.mark.parametrize("kind", OPS)
def test_the_widest_layer_keeps_int32_sums_exact(kind):
    k = MAX_IN_FEATURES
    q = torch.full((2, k), -127, dtype=torch.int8)
    x = torch.full((1, k), 3.0)
    x[0, 0] = -1.0  # zero point 64: the largest products land far from zero
    scale = torch.ones(2)
    y = OPS[kind][1](x, *OPS[kind][0](q), scale, None, k)
    torch.testing.assert_close(y, dyn_linear_from_dense(x, q, scale, None), rtol=1e-6, atol=0)


def test_quantize_rows_is_exact_for_zero_and_extremes():
    x = torch.tensor([[0.0, -2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 2.0, 4.0]])
    q, step, zero = quantize_rows(x)
    restored = step[:, None] * (q.float() - zero[:, None].float())
    assert bool((restored[:2, 0] == 0).all())  # zero stays exact
    assert torch.allclose(restored, x, atol=float(step.max()) / 2 + 1e-6)
    assert zero.tolist()[2] == 0 and int(q[2].max()) == 255  # a ReLU row keeps all 256 levels


@pytest.mark.parametrize("kind", OPS)
def test_builders_and_ops_refuse_bad_input(kind):
    build, op = OPS[kind]
    with pytest.raises(TypeError, match="int8"):
        build(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="in_features"):
        build(torch.zeros(1, MAX_IN_FEATURES + 1, dtype=torch.int8))
    q = weights(6, 10, 0.5)
    layout = build(q)
    with pytest.raises(RuntimeError, match="features"):
        op(torch.randn(2, 9), *layout, torch.ones(6), None, 10)
    with pytest.raises(RuntimeError, match="row_sum"):
        op(torch.randn(2, 10), *layout[:3], layout[3].long(), torch.ones(6), None, 10)
    broken = layout[0].clone()
    broken[-1] += 1
    with pytest.raises(RuntimeError, match="row_ptr"):
        op(torch.randn(2, 10), broken, *layout[1:], torch.ones(6), None, 10)


def test_layout_checks_catch_tampering():
    q = weights(6, 70, 0.5)
    row_ptr, mask, values, _ = bitmask_layout(q)
    bad = mask.clone()
    bad[0, 0] ^= 1
    with pytest.raises(ValueError, match="disagree"):
        check_bitmask_layout(row_ptr, bad, values, (6, 70))
    bad = mask.clone()
    bad[0, 1] |= 1 << 40  # column 104 of a 70-column weight
    with pytest.raises(ValueError, match="past column"):
        check_bitmask_layout(row_ptr, bad, values, (6, 70))
    row_ptr, group, values, _ = block_layout(q)
    bad = group.clone()
    bad[0] = 18
    with pytest.raises(ValueError, match="out of range"):
        check_block_layout(row_ptr, bad, values, (6, 70))


PORTABLE = """
import torch
from lightning_compress.ops.dyn_linear import *
torch.manual_seed(0)
q = torch.randint(-127, 128, (33, 150), dtype=torch.int8)
q[torch.rand(33, 150) < 0.7] = 0
s, b = torch.rand(33) + 0.1, torch.randn(33)
for batch in (1, 3, 40):
    x = torch.randn(batch, 150)
    ref = dyn_linear_from_dense(x, q, s, b)
    for y in (bitmask_dyn_linear(x, *bitmask_layout(q), s, b, 150),
              block_dyn_linear(x, *block_layout(q), s, b, 150)):
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-4)
print("portable ok")
"""


def test_portable_loops_compute_the_same_integers():
    env = dict(os.environ, LIGHTNING_COMPRESS_NO_AVX512="1")
    out = subprocess.run(
        [sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "portable ok" in out.stdout
