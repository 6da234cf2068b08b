import os
import subprocess
import sys

import pytest
import torch

from lightning_compress.ops.packed import (
    check_sparse_layout,
    dense_from_sparse,
    hugepage_copy,
    int_linear,
    int_linear_reference,
    pack_rows_int4,
    sparse_int_linear,
    sparse_int_linear_reference,
    sparse_layout,
    unpack_rows_int4,
)

BATCHES = [0, 1, 2, 3, 5, 17, 64, 65, 130]  # gather path, 1-4 vector tiles, several 64-col tiles


def weights(n, k, density, gen, low=-127, high=127):
    q = torch.randint(low, high + 1, (n, k), dtype=torch.int8, generator=gen)
    q[torch.rand(n, k, generator=gen) >= density] = 0
    if n > 2:
        q[1] = 0  # an empty row between full ones
        q[2] = torch.randint(1, high + 1, (k,), dtype=torch.int8, generator=gen)
    return q


def assert_matches(y, ref, k):
    # Sums of up to k products of |q| <= 127, |x| ~ 3, scales <= 0.02: fp32 rounding of the sum.
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(k, 1))


@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 13), (33, 100), (100, 33), (300, 1100)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_matches_reference(n, k, density, bias, device):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    q = weights(n, k, density, gen)
    layout = sparse_layout(q)
    scale = torch.rand(n, generator=gen) * 0.02
    b = torch.randn(n, generator=gen) if bias else None
    on_device = [t if t is None else t.to(device) for t in (*layout, scale, b)]
    for batch in BATCHES:
        x = torch.randn(batch, k, generator=gen)
        y = sparse_int_linear(x.to(device), *on_device, k)
        assert y.shape == (batch, n) and y.device.type == device
        assert_matches(y.cpu(), sparse_int_linear_reference(x, *layout, scale, b, k), k)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (9, 13), (40, 257), (64, 1024)])
@pytest.mark.parametrize("bits", [8, 4])
def test_dense_matches_reference(n, k, bits, device):
    gen = torch.Generator().manual_seed(n + k + bits)
    top = 127 if bits == 8 else 7
    q = weights(n, k, 0.8, gen, low=-top - (bits == 4), high=top)
    qweight = q if bits == 8 else pack_rows_int4(q)
    scale = torch.rand(n, generator=gen) * 0.02
    b = torch.randn(n, generator=gen)
    on_device = [t.to(device) for t in (qweight, scale, b)]
    for batch in [1, 2, 4, 5, 16, 17, 70]:  # GEMV, blocked GEMV, dequantize + mm
        x = torch.randn(batch, k, generator=gen)
        y = int_linear(x.to(device), *on_device, bits).cpu()
        assert_matches(y, int_linear_reference(x, qweight, scale, b, bits), k)
        assert_matches(y, x @ (q.float() * scale[:, None]).T + b, k)


@pytest.mark.parametrize("batch", [1, 3, 70])
def test_fused_output_fake_quantization_matches_torch(batch):
    gen = torch.Generator().manual_seed(batch)
    n, k = 37, 91
    q = weights(n, k, 0.3, gen)
    scale, b = torch.rand(n, generator=gen) * 0.01, torch.randn(n, generator=gen)
    x = torch.randn(batch, k, generator=gen)
    act = (0.05, 100, 255)
    y = sparse_int_linear(x, *sparse_layout(q), scale, b, k, *act)
    expected = torch.fake_quantize_per_tensor_affine(
        sparse_int_linear(x, *sparse_layout(q), scale, b, k), 0.05, 100, 0, 255
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    dense = int_linear(x, q, scale, b, 8, *act)
    torch.testing.assert_close(
        dense, int_linear_reference(x, q, scale, b, 8, *act), rtol=0, atol=0.05
    )
    levels = dense / 0.05
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_int32_columns_past_65536_inputs():
    gen = torch.Generator().manual_seed(0)
    n, k = 3, 70_000
    q = torch.zeros(n, k, dtype=torch.int8)
    cols = torch.randint(0, k, (n, 50), generator=gen)
    q.scatter_(1, cols, torch.randint(1, 100, (n, 50), dtype=torch.int8, generator=gen))
    q[0, k - 1] = 5
    layout = sparse_layout(q)
    assert layout[1].dtype == torch.int32
    scale = torch.ones(n)
    for batch in (1, 4):
        x = torch.randn(batch, k, generator=gen)
        y = sparse_int_linear(x, *layout, scale, None, k)
        assert_matches(y, x @ q.float().T, 1000)


def test_layout_round_trip_and_narrow_columns():
    gen = torch.Generator().manual_seed(1)
    q = weights(20, 65536, 0.01, gen)
    q[3, 65535] = -7  # the last column needs all 16 bits
    row_ptr, col, values = sparse_layout(q)
    assert col.dtype == torch.int16 and values.dtype == torch.int8
    assert row_ptr[-1] == values.numel() == int((q != 0).sum())
    assert torch.equal(dense_from_sparse(row_ptr, col, values, tuple(q.shape)), q)
    check_sparse_layout(row_ptr, col, values, tuple(q.shape))


def test_int4_rows_round_trip_odd_width():
    q = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = pack_rows_int4(q)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_rows_int4(packed, 7), q)
    with pytest.raises(ValueError, match="-8, 7"):
        pack_rows_int4(torch.full((1, 2), 9, dtype=torch.int8))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda rp, c, v: (rp, c.clone().fill_(9), v), "out of range"),
        (lambda rp, c, v: (rp.flip(0), c, v), "run from 0|decrease"),
        (lambda rp, c, v: (rp.int(), c, v), "int64"),
        (lambda rp, c, v: (rp, c.int(), v), "col must be"),
        (lambda rp, c, v: (rp, c, v.int()), "int8"),
        (lambda rp, c, v: (rp.clone().index_fill_(0, torch.tensor([4]), 1), c, v), "run from 0"),
    ],
)
def test_check_sparse_layout_rejects_malformed_layouts(mutate, match):
    q = torch.tensor([[0, 1, 0, 2, 0, 0, 0, 3, 0]] * 4, dtype=torch.int8)
    layout = mutate(*sparse_layout(q))
    with pytest.raises(ValueError, match=match):
        check_sparse_layout(*layout, (4, 9))


def _small():
    q = torch.tensor([[1, 0, -2], [0, 0, 3]], dtype=torch.int8)
    return q, sparse_layout(q), torch.ones(2), torch.zeros(2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda q, lay, s, b: sparse_int_linear(torch.ones(1, 3).double(), *lay, s, b, 3),
            "float32",
        ),
        (lambda q, lay, s, b: sparse_int_linear(torch.ones(1, 1, 3), *lay, s, b, 3), "2-D"),
        (
            lambda q, lay, s, b: sparse_int_linear(torch.ones(1, 3), *lay, torch.ones(3), b, 3),
            "scale",
        ),
        (
            lambda q, lay, s, b: sparse_int_linear(torch.ones(1, 3), *lay, s, torch.ones(5), 3),
            "bias",
        ),
        (lambda q, lay, s, b: sparse_int_linear(torch.ones(1, 4), *lay, s, b, 3), "features"),
        (
            lambda q, lay, s, b: sparse_int_linear(
                torch.ones(1, 3), lay[0], lay[1].long(), lay[2], s, b, 3
            ),
            "int16",
        ),
        (
            lambda q, lay, s, b: sparse_int_linear(torch.ones(1, 3), *lay, s, b, 3, -1.0),
            "act_scale",
        ),
        (lambda q, lay, s, b: int_linear(torch.ones(1, 3), q, s, b, 3), "bits"),
        (lambda q, lay, s, b: int_linear(torch.ones(1, 4), q, s, b, 8), "qweight"),
        (lambda q, lay, s, b: int_linear(torch.ones(1, 3), q, s, b, 4), "4-bit"),
    ],
)
def test_bad_inputs_raise_with_the_reason(call, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(*_small())


def test_opcheck(device):
    q, layout, scale, bias = _small()
    q, scale, bias, x = (t.to(device) for t in (q, scale, bias, torch.randn(3, 3)))
    row_ptr, col, values = (t.to(device) for t in layout)
    sparse = torch.ops.lightning_compress.sparse_int_linear.default
    dense = torch.ops.lightning_compress.int_linear.default
    torch.library.opcheck(sparse, (x, row_ptr, col, values, scale, bias, 3))
    torch.library.opcheck(sparse, (x, row_ptr, col, values, scale, None, 3, 0.1, 3, 255))
    torch.library.opcheck(dense, (x, q, scale, bias, 8))
    torch.library.opcheck(dense, (x, pack_rows_int4(q), scale, None, 4, 0.1, 3, 255))
    hugepage = torch.ops.lightning_compress.hugepage_copy.default
    torch.library.opcheck(hugepage, (torch.randn(4, 5, device=device),))
    torch.library.opcheck(hugepage, (torch.randn(5, 4, device=device).t(),))


def test_hugepage_copy_is_an_equal_independent_copy():
    for t in (torch.randn(3, 4), torch.randint(-5, 5, (3 << 20,), dtype=torch.int8)):
        copy = hugepage_copy(t)
        assert torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()
        copy.view(-1)[0] += 1
        assert not torch.equal(copy, t)


PORTABLE = """
import torch
from lightning_compress.ops.packed import *
g = torch.Generator().manual_seed(0)
for n, k, batch in [(33, 100, 1), (33, 100, 2), (50, 77, 8), (40, 300, 70)]:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q[torch.rand(n, k, generator=g) < 0.7] = 0
    x, s, b = torch.randn(batch, k, generator=g), torch.rand(n, generator=g), torch.randn(n)
    lay = sparse_layout(q)
    for y, r in [
        (sparse_int_linear(x, *lay, s, b, k), sparse_int_linear_reference(x, *lay, s, b, k)),
        (int_linear(x, q, s, b, 8), int_linear_reference(x, q, s, b, 8)),
    ]:
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-3)
print("portable ok")
"""


def test_portable_kernels_without_avx512():
    env = dict(os.environ, LIGHTNING_COMPRESS_NO_AVX512="1")
    out = subprocess.run(
        [sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "portable ok" in out.stdout
