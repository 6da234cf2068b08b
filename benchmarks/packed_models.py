"""Packed example and zoo models end to end against their fp32 selves.

For LeNet-300-100, LeNet-5, a BERT-like ``TinyEncoder`` (hidden 128, 2 blocks, sequence 32) and
a ResNet-18 (32x32 inputs), random-initialised and seeded: every packable layer is
magnitude-pruned to each ``--sparsities`` value, ``pack(model, path, bits=8)``, then for each
batch size ``load_into(copy, path, batch_size=b, example=x)`` (each layer gets the implementation
measured fastest, :mod:`lightning_compress.export.latency`) and ``model(x)``, timed against the
fp32 model and against a second copy of the fp32 model (the control: the ratio two identical
models measure, i.e. the noise). The three take turns; a sample is the mean of enough calls to
last a few milliseconds; the ratio fp32 / packed is taken per repetition (same machine state)
and its median reported, with the control's. Prints the CPU model, threads, each ratio, the
implementations chosen and the largest output difference.

    python benchmarks/packed_models.py [--sparsities 0 0.5 0.9] [--batches 1 32] [--reps 31]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lightning_compress.export import load_into, pack, packable_layers
from lightning_compress.export.latency import LatencyTable, cpu_model
from lightning_compress.zoo import LeNet5, LeNet300100, ResNet18, TinyEncoder


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (model, one input)."""
    torch.manual_seed(0)
    return {
        "lenet300": (LeNet300100(), torch.randn(1, 1, 28, 28)),
        "lenet5": (LeNet5(), torch.randn(1, 1, 28, 28)),
        "tiny_encoder": (TinyEncoder(), torch.randint(0, 1000, (1, 32))),
        "resnet18": (ResNet18(), torch.randn(1, 3, 32, 32)),
    }


def pruned(model: nn.Module, sparsity: float) -> nn.Module:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer in packable_layers(model).values():
            w = layer.weight
            if sparsity:
                w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return model


def interleaved(models: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each model, per repetition, the models taking turns."""
    start = time.perf_counter()
    models["fp32"](x)
    once = time.perf_counter() - start
    calls = max(1, min(200, int(0.005 / max(once, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(reps + 2):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            if rep >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - start) / calls)
    return times


def ratio(base: list[float], other: list[float]) -> float:
    """Median over repetitions of base / other."""
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.0, 0.5, 0.9])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/packed_models.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = LatencyTable(Path(tmp) / "latency.json")
        for name, (base, one) in models().items():
            for sparsity in args.sparsities:
                model = pruned(base, sparsity)
                path = pack(model, Path(tmp) / f"{name}.safetensors", bits=8)
                for batch in args.batches:
                    x = one.expand(batch, *one.shape[1:]).contiguous()
                    packed = load_into(
                        copy.deepcopy(model), path, batch_size=batch, example=x, latency=table
                    )
                    impls = Counter(m.impl for m in packed.modules() if hasattr(m, "latency_ms"))
                    control = copy.deepcopy(model)
                    t = interleaved(
                        {"fp32": model, "packed": packed, "control": control}, x, args.reps
                    )
                    speedup, noise = ratio(t["fp32"], t["packed"]), ratio(t["fp32"], t["control"])
                    fp32_ms = 1e3 * statistics.median(t["fp32"])
                    packed_ms = 1e3 * statistics.median(t["packed"])
                    diff = float((packed(x) - model(x)).abs().max())
                    rows.append(
                        {
                            "model": name,
                            "sparsity": sparsity,
                            "batch": batch,
                            "fp32_ms": fp32_ms,
                            "packed_ms": packed_ms,
                            "ratio": speedup,
                            "control_ratio": noise,
                            "impls": dict(impls),
                            "max_abs_diff": diff,
                        }
                    )
                    print(
                        f"{name:13s} sparsity {sparsity:.2f} batch {batch:3d}: fp32 "
                        f"{fp32_ms:8.3f} ms, packed {packed_ms:8.3f} ms, {speedup:.2f}x "
                        f"(fp32 vs its copy {noise:.2f}x); {dict(impls)}; max |diff| {diff:.2g}",
                        flush=True,
                    )
    facts = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__}
    args.out.write_text(json.dumps({**facts, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
