import os
import subprocess
import sys

import pytest
import torch

from lightning_compress import ops
from lightning_compress.ops.shared_weight import (
    shared_weight_backward_reference,
    shared_weight_forward_reference,
)


def layer(shape, groups, levels, seed=0, sparsity=0.3):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    weight[torch.rand(shape, generator=g) < sparsity] = 0.0
    indices = torch.randint(0, levels, shape, generator=g, dtype=torch.uint8)
    codebook = torch.randn(groups, levels, generator=g)
    grad = torch.randn(shape, generator=g)
    return weight, indices, codebook, grad


def centroid_sums(grad, weight, indices, groups, levels):
    keep = (weight != 0).reshape(groups, -1)
    flat = indices.reshape(groups, -1).long() + levels * torch.arange(groups)[:, None]
    sums = torch.zeros(groups * levels, dtype=torch.float64)
    sums.index_add_(0, flat[keep], grad.reshape(groups, -1).double()[keep])
    return sums.view(groups, levels)


@pytest.mark.parametrize("levels", [2, 3, 4, 8, 15, 16, 17, 32, 33, 64, 200, 256])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((1, 1), 1), ((37, 53), 1), ((12, 3, 3, 5), 4), ((300, 784), 1), ((300, 784), 300)],
)
def test_compiled_matches_reference(shape, groups, levels, device):
    weight, indices, codebook, grad = layer(shape, groups, levels, seed=levels)
    weight.view(shape[0], -1)[0, :7] = 0.0  # zeros at the start of a row and of a vector
    args = [t.to(device) for t in (weight, indices, codebook)]
    out = ops.shared_weight_forward(*args).cpu()
    assert torch.equal(out, shared_weight_forward_reference(weight, indices, codebook))
    assert torch.all(out[weight == 0] == 0) and not torch.any(torch.signbit(out[weight == 0]))
    got_grad, ref_grad = grad.to(device), grad.clone()
    grad_codebook = ops.shared_weight_backward_(got_grad, *args[:2], groups, levels).cpu()
    ref_codebook = shared_weight_backward_reference(ref_grad, weight, indices, groups, levels)
    assert torch.equal(got_grad.cpu(), ref_grad)
    assert torch.equal(ref_grad, grad * (weight != 0))
    exact = centroid_sums(grad, weight, indices, groups, levels)  # float64: the sum orders differ
    torch.testing.assert_close(grad_codebook.double(), exact, rtol=1e-5, atol=1e-4)
    # bincount sums in float32 as it goes: the compiled kernel's per-block sums are closer.
    torch.testing.assert_close(ref_codebook.double(), exact, rtol=1e-4, atol=1e-3)


def test_reference_sums_each_groups_gradient_per_centroid():
    weight = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0], [5.0, 6.0, 7.0], [0.0, 8.0, 9.0]])
    indices = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.uint8)
    grad = torch.arange(1.0, 13.0).view(4, 3)
    codebook = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    for fn in (ops.shared_weight_backward_, shared_weight_backward_reference):
        g = grad.clone()
        assert fn(g, weight, indices, 2, 2).tolist() == [[1.0, 3 + 4 + 5], [7 + 8 + 11, 9 + 12]]
        assert g.tolist() == [[1, 0, 3], [4, 5, 0], [7, 8, 9], [0, 11, 12]]
    for fn in (ops.shared_weight_forward, shared_weight_forward_reference):
        assert fn(weight, indices, codebook).tolist() == [
            [10, 0, 20],
            [20, 20, 0],
            [30, 30, 40],
            [0, 30, 40],
        ]


def test_nan_weights_take_their_centroid_and_negative_zeros_are_zeros():
    weight = torch.tensor([[float("nan"), -0.0, 1.0]])
    indices = torch.tensor([[1, 1, 0]], dtype=torch.uint8)
    out = ops.shared_weight_forward(weight, indices, torch.tensor([[5.0, 7.0]]))
    assert out.tolist() == [[7.0, 0.0, 5.0]]
    grad = torch.ones(1, 3)
    assert ops.shared_weight_backward_(grad, weight, indices, 1, 2).tolist() == [[1.0, 1.0]]
    assert grad.tolist() == [[1.0, 0.0, 1.0]]


def test_non_contiguous_inputs():
    weight, indices, codebook, grad = layer((40, 24), 2, 16)
    wt, it, gt = (t.t().contiguous().t() for t in (weight, indices, grad))
    assert not wt.is_contiguous() and not gt.is_contiguous()
    out = ops.shared_weight_forward(wt, it, codebook.t().contiguous().t())
    assert torch.equal(out, shared_weight_forward_reference(weight, indices, codebook))
    ref = grad.clone()
    expected = shared_weight_backward_reference(ref, weight, indices, 2, 16)
    got = ops.shared_weight_backward_(gt, wt, it, 2, 16)
    assert torch.equal(gt, ref)  # written back through the strides
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [4, 16, 256])
def test_centroid_gradient_is_bit_identical_across_runs_and_thread_counts(levels):
    weight, indices, _, grad = layer((512, 700), 2, levels)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(ops.shared_weight_backward_(grad.clone(), weight, indices, 2, levels))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_indices_past_the_codebook_raise():
    weight, indices, codebook, grad = layer((8, 40), 1, 16)
    indices[3, 17] = 16
    for fn in (ops.shared_weight_forward, shared_weight_forward_reference):
        with pytest.raises(IndexError, match="out of range"):
            fn(weight, indices, codebook)
    for fn in (ops.shared_weight_backward_, shared_weight_backward_reference):
        with pytest.raises(IndexError, match="out of range"):
            fn(grad.clone(), weight, indices, 1, 16)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w, i, c, g: ops.shared_weight_forward(w.double(), i, c), "float32"),
        (lambda w, i, c, g: ops.shared_weight_forward(w, i.int(), c), "uint8"),
        (lambda w, i, c, g: ops.shared_weight_forward(w, i, c[:, None]), "codebook"),
        (lambda w, i, c, g: ops.shared_weight_forward(w, i, c.expand(3, 16)), "groups"),
        (lambda w, i, c, g: ops.shared_weight_backward_(g[:, :5], w, i, 1, 16), "grad"),
        (lambda w, i, c, g: ops.shared_weight_backward_(g, w, i, 1, 257), "levels"),
    ],
)
def test_bad_inputs(call, match):
    weight, indices, codebook, grad = layer((8, 40), 1, 16)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(weight, indices, codebook, grad)


def test_opcheck(device):
    weight, indices, codebook, grad = (t.to(device) for t in layer((12, 20), 3, 5))
    torch.library.opcheck(
        torch.ops.lightning_compress.shared_weight_forward.default, (weight, indices, codebook)
    )
    torch.library.opcheck(
        torch.ops.lightning_compress.shared_weight_backward_.default,
        (grad, weight, indices, 3, 5),
    )


PORTABLE = """
import torch
from lightning_compress import ops
from lightning_compress.ops.shared_weight import *
assert not ops.shared_weight_forward.uses_reference
for levels in (2, 16, 17, 256):
    for groups in (1, 3):
        g = torch.Generator().manual_seed(levels)
        w = torch.randn(33, 70, generator=g)
        w[torch.rand(33, 70, generator=g) < 0.3] = 0
        i = torch.randint(0, levels, (33, 70), generator=g, dtype=torch.uint8)
        c, grad = torch.randn(groups, levels, generator=g), torch.randn(33, 70, generator=g)
        assert torch.equal(shared_weight_forward(w, i, c), shared_weight_forward_reference(w, i, c))
        a, b = grad.clone(), grad.clone()
        got = shared_weight_backward_(a, w, i, groups, levels)
        ref = shared_weight_backward_reference(b, w, i, groups, levels)
        assert torch.equal(a, b)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
print("portable ok")
"""


@pytest.mark.skipif(not ops.compiled_available(), reason="needs the compiled extension")
def test_portable_loops_without_avx512():
    env = dict(os.environ, LIGHTNING_COMPRESS_NO_AVX512="1")
    out = subprocess.run(
        [sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "portable ok" in out.stdout
