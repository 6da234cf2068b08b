"""Linear-layer latency: our packed int8 kernels against what users would pick instead.

For each shape (in_features x out_features) and batch size, in one process and interleaved:

- ``fp32``      dense ``F.linear``
- ``bf16``      dense ``F.linear`` in bfloat16 (weights and activations)
- ``qdynamic``  torch's ``quantize_dynamic`` int8 ``nn.Linear`` (wrapped in a Sequential,
                which it needs to quantize the layer)
- ``csr<p>``    torch's CSR matmul (int32 indices, fp32 values) at sparsity p
- ``int8``      ours, dense int8 weights
- ``sparse<p>`` ours, compressed rows of int8 at sparsity p (50/75/90/95%)
- ``bitmask<p>``, ``block<p>`` ours, int8 x int8 with activations quantized per row
  (:mod:`lightning_compress.ops.dyn_linear`): a bitmask plus values, or groups of 4 columns

Ours hold their weights as the packed inference modules do: copies of 2 MiB and more in
transparent huge pages (``hugepage_copy``); torch's methods use torch's allocator.

Weights are cold: every method cycles through enough copies of its weights to exceed the
last-level cache by a quarter, so each call reads its weights from memory, as in a model much
larger than the cache. The memory-bandwidth bound is measured in the same run (reading a
buffer of the same size) and each method's share of it is reported: the bytes its weights
occupy over the bandwidth, divided by its time. A repetition runs every method once in turn;
the median over repetitions is reported, with speed-ups taken per repetition (same machine
state) and then the median.

    python benchmarks/kernels.py [--threads 2] [--reps 7] [--shapes 4096x11008] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_compress.export.latency import last_level_cache_bytes
from lightning_compress.ops import compiled_available
from lightning_compress.ops.dyn_linear import (
    bitmask_dyn_linear,
    bitmask_layout,
    block_dyn_linear,
    block_layout,
)
from lightning_compress.ops.packed import (
    hugepage_copy,
    int_linear,
    sparse_int_linear,
    sparse_layout,
)

SPARSITIES = (0.5, 0.75, 0.9, 0.95)
BATCHES = (1, 8, 64, 256)
SHAPES = ((1024, 1024), (4096, 4096), (4096, 11008))


class Method:
    """A way to run one linear layer: its weight copies, their bytes, and one call."""

    def __init__(self, name: str, make: Callable[[], object], nbytes: int, budget: int) -> None:
        self.name = name
        self.nbytes = nbytes
        self.copies = [make() for _ in range(max(2, -(-budget // max(nbytes, 1))))]
        self.next = 0
        self.times: list[float] = []

    def call(self, run: Callable[[object], torch.Tensor]) -> float:
        weights = self.copies[self.next % len(self.copies)]
        self.next += 1
        start = time.perf_counter()
        run(weights)
        return time.perf_counter() - start


def random_int8(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    q[q == 0] = 1
    if sparsity:
        q[torch.rand(n, k, generator=gen) < sparsity] = 0
    return q


def build_methods(k: int, n: int, budget: int, gen: torch.Generator) -> dict[str, tuple]:
    """name -> (Method, runner(weights, x32, x16) -> tensor)."""
    w = torch.randn(n, k, generator=gen) * 0.02
    bias = torch.randn(n, generator=gen) * 0.01
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    out: dict[str, tuple] = {}

    def add(name, make, nbytes, run):
        out[name] = (Method(name, make, nbytes, budget), run)

    add("fp32", lambda: w.clone(), w.numel() * 4, lambda wt, x, xb: F.linear(x, wt, bias))
    bias16 = bias.bfloat16()
    add(
        "bf16",
        lambda: w.bfloat16(),
        w.numel() * 2,
        lambda wt, x, xb: F.linear(xb, wt, bias16),
    )

    def make_qd():
        layer = nn.Sequential(nn.Linear(k, n))
        layer[0].weight.data.copy_(w)
        layer[0].bias.data.copy_(bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8)

    add("qdynamic", make_qd, w.numel() + n * 8, lambda m, x, xb: m(x))
    q = random_int8(n, k, 0.0, gen)
    add(
        "int8",
        lambda: hugepage_copy(q),
        q.numel(),
        lambda qw, x, xb: int_linear(x, qw, scale, bias, 8),
    )
    for p in SPARSITIES:
        qs = random_int8(n, k, p, gen)
        layout = sparse_layout(qs)
        nbytes = sum(t.numel() * t.element_size() for t in layout)
        add(
            f"sparse{int(p * 100)}",
            lambda layout=layout: (layout[0].clone(), *(hugepage_copy(t) for t in layout[1:])),
            nbytes,
            lambda lay, x, xb: sparse_int_linear(x, *lay, scale, bias, k),
        )
        for name, build, op in (
            ("bitmask", bitmask_layout, bitmask_dyn_linear),
            ("block", block_layout, block_dyn_linear),
        ):
            lay = build(qs)
            add(
                f"{name}{int(p * 100)}",
                lambda lay=lay: tuple(hugepage_copy(t) for t in lay),
                sum(t.numel() * t.element_size() for t in lay[1:3]),
                lambda lay, x, xb, op=op: op(x, *lay, scale, bias, k),
            )
        csr = (qs.float() * scale[:, None]).to_sparse_csr()
        csr = torch.sparse_csr_tensor(
            csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape
        )
        nbytes = csr.values().numel() * 8 + (n + 1) * 4
        add(
            f"csr{int(p * 100)}",
            lambda csr=csr: csr.clone(),
            nbytes,
            lambda m, x, xb: torch.addmm(bias[:, None], m, x.t()).t(),
        )
    return out


def bandwidth(budget: int, reps: int) -> float:
    """Bytes per second of reading a buffer of ``budget`` bytes (median of ``reps``)."""
    buf = torch.ones(budget // 4)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return budget / statistics.median(times)


def run_shape(k: int, n: int, batches, reps: int, budget: int, gen) -> list[dict]:
    methods = build_methods(k, n, budget, gen)
    rows = []
    for batch in batches:
        x = torch.randn(batch, k, generator=gen)
        xb = x.bfloat16()
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for method, run in methods.values():  # warm-up
            for _ in range(2):
                method.call(lambda wt, run=run, x=x, xb=xb: run(wt, x, xb))
        bw = []
        for _ in range(reps):
            bw.append(bandwidth(budget, 1))
            for name, (method, run) in methods.items():
                calls = max(1, min(len(method.copies), 64))
                total = sum(
                    method.call(lambda wt, run=run, x=x, xb=xb: run(wt, x, xb))
                    for _ in range(calls)
                )
                samples[name].append(total / calls)
        bytes_per_s = statistics.median(bw)
        for name, (method, _) in methods.items():
            med = statistics.median(samples[name])
            ratios = {
                base: statistics.median(
                    b / s for b, s in zip(samples[base], samples[name], strict=True)
                )
                for base in ("fp32", "qdynamic")
            }
            rows.append(
                {
                    "shape": f"{k}x{n}",
                    "batch": batch,
                    "method": name,
                    "ms": med * 1e3,
                    "weight_bytes": method.nbytes,
                    "bandwidth_GBps": bytes_per_s / 1e9,
                    "bandwidth_share": method.nbytes / bytes_per_s / med,
                    "speedup_vs_fp32": ratios["fp32"],
                    "speedup_vs_qdynamic": ratios["qdynamic"],
                }
            )
        print_batch(rows[-len(methods) :])
    return rows


def print_batch(rows: list[dict]) -> None:
    head = rows[0]
    print(
        f"\n{head['shape']} batch {head['batch']}  "
        f"(memory bandwidth {head['bandwidth_GBps']:.1f} GB/s measured in this run)"
    )
    print(f"  {'method':<10} {'ms':>9} {'MB':>8} {'bw share':>9} {'vs fp32':>8} {'vs qdyn':>8}")
    for r in rows:
        print(
            f"  {r['method']:<10} {r['ms']:9.3f} {r['weight_bytes'] / 1e6:8.2f} "
            f"{100 * r['bandwidth_share']:8.1f}% {r['speedup_vs_fp32']:7.2f}x "
            f"{r['speedup_vs_qdynamic']:7.2f}x"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows}, key=lambda s: [int(v) for v in s.split("x")])
    batches = sorted({r["batch"] for r in rows})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "fp32"]
    fig, axes = plt.subplots(
        len(shapes), len(batches), figsize=(3.2 * len(batches), 2.8 * len(shapes)), squeeze=False
    )
    for i, shape in enumerate(shapes):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            sel = {r["method"]: r for r in rows if r["shape"] == shape and r["batch"] == batch}
            vals = [sel[m]["speedup_vs_fp32"] if m in sel else 0.0 for m in methods]
            colors = [
                "tab:green" if m.startswith(("sparse", "int8")) else "tab:gray" for m in methods
            ]
            ax.bar(range(len(methods)), vals, color=colors)
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", linewidth=0.5)
            ax.set_title(f"{shape}, batch {batch}", fontsize=8)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=90, fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            if j == 0:
                ax.set_ylabel("speed-up over fp32", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES])
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not compiled_available():
        raise SystemExit("the compiled ops are not loaded; reinstall to build them")
    budget = last_level_cache_bytes() * 5 // 4
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, weights cycled through >= {budget / 2**20:.0f} MiB per method")
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        rows += run_shape(k, n, args.batches, args.reps, budget, gen)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "reps": args.reps,
        "cycled_bytes": budget,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
