"""Packed example and zoo models end to end against their fp32 selves.

For LeNet-300-100, LeNet-5, a BERT-like ``TinyEncoder`` (hidden 128, 2 blocks, sequence 32) and
a ResNet-18 (32x32 inputs), random-initialised and seeded: every packable layer is
magnitude-pruned to each ``--sparsities`` value, ``pack(model, path, bits=8)``, then for each
batch size ``load_into(copy, path, batch_size=b, example=x)`` (each layer gets the implementation
measured fastest, :mod:`lightning_compress.export.latency`) and ``model(x)``, timed against the
fp32 model with :func:`lightning_compress.export.measure.latency` (interleaved, medians). Prints
the CPU model, threads, each ratio fp32 / packed, the implementations chosen and the largest
output difference.

    python benchmarks/packed_models.py [--sparsities 0 0.5 0.9] [--batches 1 32] [--reps 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lightning_compress.export import load_into, pack, packable_layers
from lightning_compress.export.latency import LatencyTable, cpu_model
from lightning_compress.export.measure import latency
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


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.0, 0.5, 0.9])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--reps", type=int, default=15)
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
                    ms = latency({"fp32": model, "packed": packed}, x, [batch], args.reps)
                    ratio = ms["fp32"][batch] / ms["packed"][batch]
                    diff = float((packed(x) - model(x)).abs().max())
                    rows.append(
                        {
                            "model": name,
                            "sparsity": sparsity,
                            "batch": batch,
                            "fp32_ms": ms["fp32"][batch],
                            "packed_ms": ms["packed"][batch],
                            "ratio": ratio,
                            "impls": dict(impls),
                            "max_abs_diff": diff,
                        }
                    )
                    print(
                        f"{name:13s} sparsity {sparsity:.2f} batch {batch:3d}: fp32 "
                        f"{ms['fp32'][batch]:8.3f} ms, packed {ms['packed'][batch]:8.3f} ms, "
                        f"{ratio:.2f}x; {dict(impls)}; max |diff| {diff:.2g}"
                    )
    facts = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__}
    args.out.write_text(json.dumps({**facts, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
