"""Model-level latency of a packed LLM-MLP stack against fp32 and torch's quantize_dynamic.

The model: ``--layers`` nn.Linear alternating 4096->11008 and 11008->4096 (an LLM's MLP shape;
every layer's weights come from memory at 4 layers and more), each magnitude-pruned to
``--sparsity``. Ours is the public path: ``pack(model, path, bits=...)`` then
``load_into(copy, path, batch_size=b)`` (each layer gets the implementation measured fastest,
:mod:`lightning_compress.export.latency`) then ``model(x)``. Baselines in the same run,
interleaved with ours, per batch size: the fp32 model and
``torch.ao.quantization.quantize_dynamic`` int8. Medians over repetitions; ratios per
repetition, then the median. Prints the CPU model, threads and the memory bandwidth measured in
the same run (reading a buffer four times the last-level cache).

    python benchmarks/packed_stack.py [--layers 4] [--sparsity 0.9] [--bits 8] [--reps 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_compress.export import load_into, pack
from lightning_compress.export.latency import LatencyTable, cpu_model


def stack(layers: int, sparsity: float, seed: int = 0) -> nn.Sequential:
    """The pruned fp32 stack."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        k, n = (4096, 11008) if i % 2 == 0 else (11008, 4096)
        layer = nn.Linear(k, n)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
            if sparsity:
                w = layer.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
        out.append(layer)
    return nn.Sequential(*out).eval()


def bandwidth(nbytes: int, reps: int = 5) -> float:
    """GB/s of reading ``nbytes`` (median of ``reps``)."""
    buf = torch.ones(nbytes // 4)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def weight_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--bits", type=int, default=8, choices=(4, 8))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = stack(args.layers, args.sparsity)
    torch_int8 = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    gbps = bandwidth(128 << 20)
    print(f"CPU {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"memory bandwidth {gbps:.1f} GB/s; {args.layers} layers, sparsity {args.sparsity}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = pack(model, Path(tmp) / "stack.safetensors", bits=args.bits)
        table = LatencyTable(Path(tmp) / "latency.json")
        for batch in args.batches:
            ours = load_into(copy.deepcopy(model), path, batch_size=batch, latency=table)
            impls = [m.impl for m in ours]
            x = torch.randn(batch, 4096)
            methods = {"fp32": model, "qdynamic": torch_int8, "ours": ours}
            times: dict[str, list[float]] = {name: [] for name in methods}
            for rep in range(args.reps + 1):
                for name, m in methods.items():
                    start = time.perf_counter()
                    m(x)
                    if rep:
                        times[name].append(time.perf_counter() - start)
            med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            ratio = {
                base: statistics.median(
                    b / o for b, o in zip(times[base], times["ours"], strict=True)
                )
                for base in ("fp32", "qdynamic")
            }
            # torch's prepacked weights are not module buffers: no share where a layer uses them.
            known = "qdynamic" not in impls
            share = weight_bytes(ours) / (gbps * 1e9) / (med["ours"] / 1e3) if known else None
            rows.append(
                {"batch": batch, "ms": med, "ours_vs": ratio, "impls": impls, "bw_share": share}
            )
            print(
                f"batch {batch:4d}: fp32 {med['fp32']:8.2f} ms, qdynamic {med['qdynamic']:7.2f}, "
                f"ours {med['ours']:7.2f} ({', '.join(impls)}"
                + (f"; {share:.0%} of its bandwidth bound" if known else "")
                + f"): {ratio['qdynamic']:.2f}x qdynamic, {ratio['fp32']:.2f}x fp32"
            )
            del ours
    if args.out:
        facts = {"cpu": cpu_model(), "threads": args.threads, "bandwidth_GBps": gbps}
        args.out.write_text(json.dumps({**facts, "args": vars(args) | {"out": None}, "rows": rows}))


if __name__ == "__main__":
    main()
