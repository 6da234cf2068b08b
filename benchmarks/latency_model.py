"""The latency model's predictions against measured whole-model latency, on random configurations.

The model is ``stack.py``'s stack: ``--layers`` (default 6) ``nn.Linear`` alternating 4096->11008
and 11008->4096 (an LLM's MLP), weights ``randn * 0.02``.

1. Calibration: ``LatencyTable.calibrate`` measures every implementation a layer can use
   (``export.modules.implementations``) on each of the stack's two shapes, at the densities of
   ``--grid`` and 8 and 4 bits, at each batch of ``--batches``, cold (the last-level cache
   flushed before every call) and warm. The modules are the ones ``load_into`` builds for a
   quantized layer (``PackedLinear`` over the layer's integers, dense at a density above 0.5 as
   ``pack`` stores it).
2. ``--configs`` (default 20) random configurations, seeded: each layer gets a sparsity drawn
   uniformly from [0, 0.95] (so mostly between the grid's densities) and 8 or 4 bits. Each goes
   through the public path: magnitude pruning, ``pack(model, path, qat=record)`` with the
   per-layer bits in the record, then ``load_into(model, path, batch_size=b,
   latency=LatencyTable(predict=True))`` on the calibrated table, which predicts every layer's
   candidates (nothing is measured there) and gives each layer the fastest predicted one.
   Predicted: the sum of the chosen implementations' predicted milliseconds. Measured:
   ``export.latency.model_latency`` of the loaded model (median of ``--reps`` forwards after
   two warm-ups, the cache flushed before every one where ``load_into`` measured cold, i.e.
   where the packed weights exceed the last-level cache), each layer timed inside it too.

Prints the CPU, threads, each configuration's predicted and measured milliseconds and their
error, and the median and worst absolute error (the acceptance: <= 10% median, <= 25% worst).

    python benchmarks/latency_model.py [--layers 6] [--configs 20] [--batches 1]
        [--threads 2] [--reps 9] [--quick] [--out benchmarks/results/latency_model.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from stack import magnitude_pruned, stack_model  # the sibling benchmark script
from torch import nn

from lightning_compress.export import load_into, pack
from lightning_compress.export.artifact import SPARSE_MAX_DENSITY
from lightning_compress.export.latency import (
    LatencyTable,
    LayerSpec,
    cache_bytes,
    cpu_model,
    model_latency,
)
from lightning_compress.export.modules import PackedLinear, implementations
from lightning_compress.quantization import CompressionRecord, QuantizedLayer, quantize_weight

GRID = (1.0, 0.51, 0.5, 0.25, 0.1, 0.05)


@torch.no_grad()
def pruned_weight(shape: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    k = round((1 - density) * w.numel())
    if k:
        w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(k).values, 0.0)
    return w


def builder(
    q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int, sparse: bool
) -> Callable[[str, LayerSpec], nn.Module]:
    """Builds one layer's module per implementation once, for every spec it is timed on."""
    built: dict[str, nn.Module] = {}

    def build(impl: str, _spec: LayerSpec) -> nn.Module:
        if impl not in built:
            built[impl] = PackedLinear(q, scale, bias, bits, sparse, impl=impl).eval()
        return built[impl]

    return build


def calibrate(
    table: LatencyTable, shapes: list[tuple[int, int]], batches: list[int], grid: tuple[float, ...]
) -> float:
    """Measures the grid; returns the seconds it took."""
    start = time.perf_counter()
    for n, k in shapes:
        bias = torch.randn(n) * 0.02
        for density in grid:
            w = pruned_weight((n, k), density, seed=n + round(100 * density))
            for bits in (8, 4):
                q, scale = quantize_weight(w, bits)
                nnz = int(q.count_nonzero())
                sparse = nnz <= SPARSE_MAX_DENSITY * q.numel()
                specs = [
                    LayerSpec("linear", n, k, bits, nnz / q.numel(), input=(b, k), cold=cold)
                    for b in batches
                    for cold in (True, False)
                ]

                build = builder(q, scale, bias, bits, sparse)
                table.calibrate(specs, build, implementations(k))
                print(
                    f"  calibrated {n}x{k} int{bits} density {nnz / q.numel():.2f}: "
                    f"{len(table.entries)} entries, {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    return time.perf_counter() - start


def random_config(layers: int, rng: random.Random) -> list[tuple[float, int]]:
    return [(rng.uniform(0.0, 0.95), rng.choice((8, 4))) for _ in range(layers)]


@torch.no_grad()
def run_config(
    base: nn.Sequential,
    config: list[tuple[float, int]],
    table: LatencyTable,
    batch: int,
    reps: int,
    tmp: Path,
) -> dict:
    model = copy.deepcopy(base)
    for i, (sparsity, _bits) in enumerate(config):
        model[i] = magnitude_pruned(nn.Sequential(model[i]), sparsity)[0]
    record = CompressionRecord(
        QuantizedLayer.from_weight(f"{i}.weight", model[i].weight, bits)
        for i, (_s, bits) in enumerate(config)
    )
    path = pack(model, tmp / "config.safetensors", qat=record)
    start = time.perf_counter()
    loaded = load_into(copy.deepcopy(base), path, batch_size=batch, latency=table)
    load_s = time.perf_counter() - start
    layers = [m for m in loaded.modules() if hasattr(m, "impl")]
    predicted = sum(m.latency_ms[m.impl] for m in layers)
    packed = sum(
        t.numel() * t.element_size() for m in loaded for t in [*m.parameters(), *m.buffers()]
    )
    del model
    timed = model_latency(loaded, torch.randn(batch, base[0].in_features), reps)
    cold, measured = timed.cold, timed.measured_ms
    return {
        "config": [{"sparsity": round(s, 3), "bits": b} for s, b in config],
        "impls": [m.impl for m in layers],
        "batch": batch,
        "cold": cold,
        "predicted_ms": predicted,
        "measured_ms": measured,
        "error": predicted / measured - 1.0,
        "layers": [
            {"impl": r.impl, "predicted_ms": r.predicted_ms, "measured_ms": r.measured_ms}
            for r in timed.layers
        ],
        "load_s": load_s,
        "loaded_bytes": packed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--configs", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1024<->2816, 2 layers, 4 configs")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "latency_model.json",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths = (1024, 2816) if args.quick else (4096, 11008)
    layers = 2 if args.quick else args.layers
    configs = 4 if args.quick else args.configs
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads")
    print(f"cache taken for a model's weights: {cache_bytes() / 2**20:.0f} MiB")
    shapes = [(widths[1], widths[0]), (widths[0], widths[1])]
    table = LatencyTable(reps=args.reps)
    calib_s = calibrate(table, shapes, args.batches, GRID)
    table.predicting = True
    base = stack_model(layers, widths)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batches:
            for c in range(configs):
                measured_before = len(table.entries)
                row = run_config(base, random_config(layers, rng), table, b, args.reps, Path(tmp))
                row["measured_in_load_into"] = len(table.entries) - measured_before
                rows.append(row)
                print(
                    f"b={b} config {c:2d}: predicted {row['predicted_ms']:8.2f} ms, measured "
                    f"{row['measured_ms']:8.2f} ms, error {100 * row['error']:+6.1f}%  "
                    f"(cold={row['cold']}, impls {','.join(row['impls'])}, "
                    f"{row['measured_in_load_into']} measured in load_into)",
                    flush=True,
                )
    errors = [abs(r["error"]) for r in rows]
    summary = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "layers": layers,
        "widths": list(widths),
        "grid": list(GRID),
        "calibration_s": calib_s,
        "calibration_entries": len(table.entries),
        "median_abs_error": statistics.median(errors),
        "worst_abs_error": max(errors),
        "rows": rows,
    }
    print(
        f"median |error| {100 * summary['median_abs_error']:.1f}%, worst "
        f"{100 * summary['worst_abs_error']:.1f}% over {len(rows)} configurations "
        f"(calibration {calib_s:.0f} s, {len(table.entries)} measurements)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
