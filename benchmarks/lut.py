"""The lookup-table sparse kernel (shared weights) against our int8 sparse kernels, weights cold.

For each shape (in_features x out_features; by default an LLM MLP layer 4096x11008 and its
transpose) at one sparsity (90%) and the same positions of the non-zeros for every method, in
one process and interleaved:

- ``lut<b>``    ``lut_sparse_linear``: compressed rows, ``b``-bit indices into float32
                codebooks (one per ``--group-rows`` output rows; two 4-bit indices per byte)
- ``sparse``    ``sparse_int_linear``: compressed rows of int8 values with a per-row scale,
                built as benchmarks/kernels.py builds it
- ``bitmask``   ``bitmask_dyn_linear``: bitmask + int8 values, activations quantized per row
                (int8 x int8 products)

Weights are held as the packed inference modules hold them (``hugepage_copy``) and are cold:
every method cycles through enough copies to exceed the last-level cache by a quarter. A
repetition runs every method in turn; medians over repetitions are reported, and speed-ups are
taken per repetition (same machine state) and then the median. The CPU model, the thread count
and the CPU time other processes took during the run are printed and recorded.

    python benchmarks/lut.py [--threads 2] [--reps 9] [--bits 4] [--batches 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from kernels import Method, last_level_cache_bytes  # the sibling benchmark scripts
from lowrank_speed import busy_seconds, cpu_model

from lightning_compress.ops import compiled_available
from lightning_compress.ops.dyn_linear import bitmask_dyn_linear, bitmask_layout
from lightning_compress.ops.lut import lut_layout, lut_sparse_linear, lut_sparse_linear_reference
from lightning_compress.ops.packed import hugepage_copy, sparse_int_linear, sparse_layout

SHAPES = ("4096x11008", "11008x4096")
BASE = "sparse"


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build_methods(
    k: int, n: int, sparsity: float, bits: list[int], group_rows: int, budget: int, gen
) -> dict[str, tuple[Method, object]]:
    """name -> (Method, runner(weights, x) -> tensor), every method with the same non-zeros."""
    mask = torch.rand(n, k, generator=gen) >= sparsity
    q = torch.randint(1, 128, (n, k), dtype=torch.int8, generator=gen)
    q = torch.where(torch.rand(n, k, generator=gen) < 0.5, -q, q)
    q[~mask] = 0
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen) * 0.01
    out: dict[str, tuple[Method, object]] = {}

    def add(name, layout, run):
        def make(layout=layout):
            return tuple(hugepage_copy(t) if isinstance(t, torch.Tensor) else t for t in layout)

        out[name] = (Method(name, make, nbytes(layout), budget), run)

    for b in bits:
        groups = -(-n // group_rows)
        codebook = torch.randn(groups, 2**b, generator=gen) * 0.02
        indices = torch.randint(0, 2**b, (n, k), dtype=torch.uint8, generator=gen)
        add(
            f"lut{b}",
            lut_layout(codebook, indices, mask),
            lambda lay, x: lut_sparse_linear(x, *lay, bias, k),
        )
    add(BASE, sparse_layout(q), lambda lay, x: sparse_int_linear(x, *lay, scale, bias, k))
    add(
        "bitmask",
        bitmask_layout(q),
        lambda lay, x: bitmask_dyn_linear(x, *lay, scale, bias, k),
    )
    return out


def check(methods: dict, k: int, gen) -> dict[str, float]:
    """Max |kernel - reference| of each LUT method on one input (the kernel is exact up to the
    order of the float sums)."""
    x = torch.randn(2, k, generator=gen)
    errors = {}
    for name, (method, _) in methods.items():
        if name.startswith("lut"):
            lay = method.copies[0]
            ref = lut_sparse_linear_reference(x, *lay[:5], None, k)
            got = lut_sparse_linear(x, *lay[:5], None, k)
            errors[name] = float((got - ref).abs().max())
    return errors


def run_shape(shape: str, args, budget: int, gen) -> list[dict]:
    k, n = (int(v) for v in shape.split("x"))
    methods = build_methods(k, n, args.sparsity, args.bits, args.group_rows, budget, gen)
    nnz = int(methods[BASE][0].copies[0][0][-1])
    errors = check(methods, k, gen)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, k, generator=gen)
        for method, run in methods.values():  # warm-up
            for _ in range(2):
                method.call(lambda wt, run=run, x=x: run(wt, x))
        samples: dict[str, list[float]] = {name: [] for name in methods}
        start = busy_seconds()
        for _ in range(args.reps):
            for name, (method, run) in methods.items():
                calls = max(1, min(len(method.copies), 64))
                total = sum(method.call(lambda wt, run=run, x=x: run(wt, x)) for _ in range(calls))
                samples[name].append(total / calls)
        end = busy_seconds()
        wall = end[0] - start[0]
        others = max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / max(wall, 1e-9)
        print(
            f"\n{shape} batch {batch}, {args.sparsity:.0%} sparse ({nnz} non-zeros), "
            f"other processes took {others:.2f} cores"
        )
        print(f"  {'method':<9} {'ms':>8} {'MB':>7} {'B/nnz':>6} {'GB/s':>6} {'vs ' + BASE:>10}")
        for name, (method, _) in methods.items():
            med = statistics.median(samples[name])
            ratio = statistics.median(
                b / s for b, s in zip(samples[BASE], samples[name], strict=True)
            )
            row = {
                "shape": shape,
                "batch": batch,
                "method": name,
                "ms": med * 1e3,
                "ms_all": [s * 1e3 for s in samples[name]],
                "weight_bytes": method.nbytes,
                "bytes_per_nonzero": method.nbytes / nnz,
                "weight_GBps": method.nbytes / med / 1e9,
                f"speedup_vs_{BASE}": ratio,
                "copies": len(method.copies),
                "other_processes_cores": others,
                "max_abs_error_vs_reference": errors.get(name),
            }
            rows.append(row)
            print(
                f"  {name:<9} {row['ms']:8.3f} {method.nbytes / 1e6:7.2f} "
                f"{row['bytes_per_nonzero']:6.2f} {row['weight_GBps']:6.1f} {ratio:9.2f}x"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--batches", nargs="*", type=int, default=[1])
    parser.add_argument("--bits", nargs="*", type=int, default=[4])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--group-rows", type=int, default=1 << 30, help="rows per codebook")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lut.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not compiled_available():
        raise SystemExit("the compiled ops are not loaded; reinstall to build them")
    budget = last_level_cache_bytes() * 5 // 4
    gen = torch.Generator().manual_seed(0)
    cpu = cpu_model()
    print(
        f"{cpu}, {args.threads} threads (torch {torch.__version__}); weights cycled through "
        f">= {budget / 2**20:.0f} MiB per method (last-level cache "
        f"{last_level_cache_bytes() / 2**20:.0f} MiB)"
    )
    rows = []
    for shape in args.shapes:
        rows += run_shape(shape, args, budget, gen)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": args.threads,
        "reps": args.reps,
        "sparsity": args.sparsity,
        "group_rows": args.group_rows,
        "cycled_bytes": budget,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
