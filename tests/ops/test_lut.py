"""The lookup-table sparse linear op: layout, kernels against the reference, opcheck, bad input."""

import os
import subprocess
import sys

import pytest
import torch

from lightning_compress.ops.lut import (
    check_lut_layout,
    dense_from_lut,
    lut_layout,
    lut_sparse_linear,
    lut_sparse_linear_reference,
    pack_indices,
    unpack_indices,
)

BATCHES = [1, 2, 3, 17, 64, 65]  # gather path, one to four vector tiles, two 64-column tiles


def shared(n, k, bits, groups, sparsity, seed=0):
    """A random shared weight: (codebook, indices, mask, dense float weight)."""
    g = torch.Generator().manual_seed(seed)
    levels = 2**bits
    codebook = torch.randn(groups, levels, generator=g)
    indices = torch.randint(0, levels, (n, k), dtype=torch.uint8, generator=g)
    mask = torch.rand(n, k, generator=g) >= sparsity
    if n > 2:
        mask[1] = False  # an empty row between full ones
        mask[2] = True
    rows = torch.arange(n)[:, None] // (n // groups)
    dense = torch.where(mask, codebook[rows, indices.long()], 0.0)
    return codebook, indices, mask, dense


def assert_matches(y, ref, k):
    # The same products summed in another order: fp32 rounding of up to k terms.
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(k, 1) ** 0.5)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("groups", [1, 6, 36])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_the_reference_and_the_dense_weight(bits, groups, sparsity, bias):
    n, k = 36, 101  # odd rows of non-zeros start mid-byte in the 4-bit stream
    codebook, indices, mask, dense = shared(n, k, bits, groups, sparsity, seed=bits * groups)
    layout = lut_layout(codebook, indices, mask)
    assert layout[4] == n // groups
    b = torch.randn(n) if bias else None
    gen = torch.Generator().manual_seed(1)
    for batch in BATCHES:
        x = torch.randn(batch, k, generator=gen)
        y = lut_sparse_linear(x, *layout, b, k)
        assert y.shape == (batch, n)
        assert_matches(y, lut_sparse_linear_reference(x, *layout, b, k), k)
        assert_matches(y, torch.nn.functional.linear(x, dense, b), k)


@pytest.mark.parametrize("bits", [4, 8])
def test_long_rows_and_non_contiguous_input(bits):
    # Rows longer than the batch path's 512-non-zero chunk; x a strided, transposed view.
    n, k = 24, 1500
    codebook, indices, mask, dense = shared(n, k, bits, 4, 0.2)
    layout = lut_layout(codebook, indices, mask)
    b = torch.randn(n)
    for batch in (1, 3, 64):
        x = torch.randn(2 * k + 1, batch)[1::2].t()  # strided both ways
        assert not x.is_contiguous()
        y = lut_sparse_linear(x, *layout, b, k)
        assert_matches(y, torch.nn.functional.linear(x.contiguous(), dense, b), k)


def test_int32_columns_past_65536_inputs():
    n, k = 4, 70_000
    codebook, indices, mask, dense = shared(n, k, 4, 2, 0.999)
    mask[0, k - 1] = True
    dense[0, k - 1] = codebook[0, int(indices[0, k - 1])]
    layout = lut_layout(codebook, indices, mask)
    assert layout[1].dtype == torch.int32
    for batch in (1, 5):
        x = torch.randn(batch, k)
        assert_matches(lut_sparse_linear(x, *layout, None, k), x @ dense.T, k)


@pytest.mark.parametrize("batch", [1, 3, 70])
def test_fused_output_fake_quantization_matches_torch(batch):
    n, k = 20, 50
    codebook, indices, mask, _ = shared(n, k, 3, 5, 0.5)
    layout = lut_layout(codebook, indices, mask)
    x, b = torch.randn(batch, k), torch.randn(n)
    act = (0.05, 100, 255)
    y = lut_sparse_linear(x, *layout, b, k, *act)
    expected = torch.fake_quantize_per_tensor_affine(
        lut_sparse_linear(x, *layout, b, k), 0.05, 100, 0, 255
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    levels = y / 0.05
    assert torch.allclose(levels, levels.round(), atol=1e-3)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (30, 64)])
def test_layout_round_trip(bits, shape):
    codebook, indices, mask, dense = shared(*shape, bits, 1, 0.4)
    layout = lut_layout(codebook, indices, mask)
    check_lut_layout(*layout, shape)
    nnz = int(mask.sum())
    assert layout[1].numel() == nnz
    assert layout[2].numel() == (-(-nnz // 2) if bits <= 4 else nnz)
    assert torch.equal(dense_from_lut(*layout, shape), dense)
    picked = indices[mask]
    assert torch.equal(unpack_indices(pack_indices(picked, 2**bits), nnz, 2**bits), picked.long())


def test_indices_past_a_small_codebook_read_zero_in_kernel_and_reference():
    # A 2-bit codebook in 4-bit storage: a tampered nibble of 15 must not read outside memory.
    n, k = 8, 40
    codebook, indices, mask, _ = shared(n, k, 2, 2, 0.0)
    row_ptr, col, idx, cb, group_rows = lut_layout(codebook, indices, mask)
    idx = idx | 0xF0
    x = torch.randn(3, k)
    ref = lut_sparse_linear_reference(x, row_ptr, col, idx, cb, group_rows, None, k)
    for batch in (1, 3):
        y = lut_sparse_linear(x[:batch], row_ptr, col, idx, cb, group_rows, None, k)
        assert_matches(y, ref[:batch], k)
    with pytest.raises(ValueError, match="past the codebook"):
        check_lut_layout(row_ptr, col, idx, cb, group_rows, (n, k))


def _small(bits=4):
    codebook, indices, mask, _ = shared(6, 9, bits, 3, 0.4)
    return lut_layout(codebook, indices, mask)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda c, i, m: (c.double(), i, m), TypeError, "codebook"),
        (lambda c, i, m: (c, i.long(), m), TypeError, "indices"),
        (lambda c, i, m: (c, i, m[:, :3]), TypeError, "mask"),
        (lambda c, i, m: (c[:, :3], i, m), ValueError, "2\\*\\*bits"),
        (lambda c, i, m: (torch.ones(1, 512), i, m), ValueError, "2\\*\\*bits"),
        (lambda c, i, m: (torch.ones(4, 16), i, m), ValueError, "divide"),
        (lambda c, i, m: (c, i.clone().fill_(16), m), ValueError, "past the codebook"),
    ],
)
def test_lut_layout_refuses_bad_input(build, error, match):
    codebook, indices, mask, _ = shared(6, 9, 4, 3, 0.4)
    with pytest.raises(error, match=match):
        lut_layout(*build(codebook, indices, mask))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda rp, c, i, cb, g: (rp.flip(0), c, i, cb, g), "run from 0|decrease"),
        (lambda rp, c, i, cb, g: (rp.index_fill(0, torch.tensor([3]), 0), c, i, cb, g), "decrease"),
        (lambda rp, c, i, cb, g: (rp.int(), c, i, cb, g), "int64"),
        (lambda rp, c, i, cb, g: (rp, c.clone().fill_(9), i, cb, g), "out of range"),
        (lambda rp, c, i, cb, g: (rp, c.int(), i, cb, g), "col must be"),
        (lambda rp, c, i, cb, g: (rp, c, i[:-1], cb, g), "idx must be"),
        (lambda rp, c, i, cb, g: (rp, c, i, cb[:1], g), "codebook must be"),
        (lambda rp, c, i, cb, g: (rp, c, i, cb, 0), "group_rows"),
    ],
)
def test_check_lut_layout_rejects_malformed_layouts(mutate, match):
    with pytest.raises(ValueError, match=match):
        check_lut_layout(*mutate(*_small()), (6, 9))


def test_byte_indices_past_the_codebook_are_caught():
    row_ptr, col, idx, cb, g = _small(bits=5)
    idx = idx.clone()
    idx[0] = 32
    with pytest.raises(ValueError, match="past the codebook"):
        check_lut_layout(row_ptr, col, idx, cb, g, (6, 9))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda lay: lut_sparse_linear(torch.ones(1, 9).double(), *lay, None, 9), "float32"),
        (lambda lay: lut_sparse_linear(torch.ones(1, 8), *lay, None, 9), "features"),
        (lambda lay: lut_sparse_linear(torch.ones(1, 9), *lay[:4], 3, None, 9), "codebook"),
        (lambda lay: lut_sparse_linear(torch.ones(1, 9), *lay[:4], 0, None, 9), "group_rows"),
        (
            lambda lay: lut_sparse_linear(
                torch.ones(1, 9), lay[0], lay[1], lay[2][:-1], *lay[3:], None, 9
            ),
            "idx",
        ),
        (
            lambda lay: lut_sparse_linear(
                torch.ones(1, 9), lay[0], lay[1].long(), *lay[2:], None, 9
            ),
            "int16",
        ),
        (
            lambda lay: lut_sparse_linear(
                torch.ones(1, 9),
                lay[0].clone().index_fill_(0, torch.tensor([6]), 99),
                *lay[1:],
                None,
                9,
            ),
            "row_ptr",
        ),
        (
            lambda lay: lut_sparse_linear(
                torch.ones(1, 9),
                lay[0].clone().index_fill_(0, torch.tensor([2]), 99),
                *lay[1:],
                None,
                9,
            ),
            "decreases",
        ),
        (lambda lay: lut_sparse_linear(torch.ones(1, 9), *lay, torch.ones(5), 9), "bias"),
        (lambda lay: lut_sparse_linear(torch.ones(1, 9), *lay, None, 9, -1.0), "act_scale"),
    ],
)
def test_bad_inputs_raise_with_the_reason(call, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(_small())


def test_fake_kernel_checks_the_preconditions_on_meta():
    layout = _small()
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in layout]
    op = torch.ops.lightning_compress.lut_sparse_linear
    out = op(torch.ones(5, 9, device="meta"), *meta, None, 9)
    assert out.shape == (5, 6) and out.device.type == "meta"
    with pytest.raises(ValueError, match="idx"):
        op(torch.ones(5, 9, device="meta"), *meta[:2], meta[2][:-1], *meta[3:], None, 9)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_opcheck(bits):
    layout = _small(bits)
    op = torch.ops.lightning_compress.lut_sparse_linear.default
    x = torch.randn(3, 9)
    torch.library.opcheck(op, (x, *layout, torch.randn(6), 9))
    torch.library.opcheck(op, (x, *layout, None, 9, 0.1, 3, 255))


PORTABLE = """
import torch
from lightning_compress.ops.lut import lut_layout, lut_sparse_linear, lut_sparse_linear_reference
g = torch.Generator().manual_seed(0)
for bits in range(1, 9):
    n, k = 30, 1100
    cb = torch.randn(3, 2**bits, generator=g)
    ind = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.5
    lay = lut_layout(cb, ind, mask)
    b = torch.randn(n, generator=g)
    for batch in (1, 3, 64):
        x = torch.randn(batch, k, generator=g)
        torch.testing.assert_close(lut_sparse_linear(x, *lay, b, k),
                                   lut_sparse_linear_reference(x, *lay, b, k), rtol=1e-5, atol=1e-3)
print("portable ok")
"""


def test_portable_loops_without_avx512():
    env = dict(os.environ, LIGHTNING_COMPRESS_NO_AVX512="1")
    out = subprocess.run(
        [sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "portable ok" in out.stdout
