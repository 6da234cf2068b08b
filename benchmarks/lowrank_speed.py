"""Low-rank layers end to end: ``pack`` -> ``load_into`` -> ``model(x)`` against dense fp32.

Models: ``nn.Sequential`` of 4096x4096 ``nn.Linear`` layers whose weights have rank 256 (each the
product of two random factors, so the low-rank artifact computes the same function):

- ``single``  one layer (64 MiB fp32);
- ``stack``   8 layers (512 MiB fp32), far larger than the last-level cache, so the dense
              weights stream from memory on every call, as a real large model's do.

Methods, in one process and interleaved:

- ``fp32``          the dense model as it is
- ``qdynamic``      torch's ``quantize_dynamic`` int8 of the dense model (the usual int8 baseline)
- ``lowrank_fp32``  the artifact with fp32 factors, loaded into a fresh model
- ``lowrank_int8``  the artifact with int8 factors (one scale per factor row)

A repetition runs every method once in turn (enough calls per sample to rise above the timer);
the median over repetitions is reported, with speed-ups taken per repetition (same machine
state) and then the median. Where the time goes: each of the first low-rank layer's two
products timed alone (torch's profiler perturbs the compiled kernels' threads too much to say).

    python benchmarks/lowrank_speed.py [--threads 2] [--reps 7] [--batches 1 64] [--out ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from kernels import last_level_cache_bytes  # the sibling benchmark script
from torch import nn
from torch.nn import functional as F

from lightning_compress.export import load_into, pack, report
from lightning_compress.lowrank.record import LowRankLayer
from lightning_compress.ops import compiled_available
from lightning_compress.quantization import CompressionRecord

FEATURES = 4096
RANK = 256
MODELS = {"single": 1, "stack": 8}
TARGET_SECONDS = 0.05  # per timed sample


def cpu_model() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def busy_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds every process has used, CPU seconds this process has used):
    the difference of two readings says how much of the machine others took meanwhile."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return time.time(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def factored_model(layers: int, gen: torch.Generator) -> tuple[nn.Sequential, list[tuple]]:
    """Dense layers of rank ``RANK``, and each layer's factors (unit gain, so a stack stays
    finite)."""
    model = nn.Sequential(*(nn.Linear(FEATURES, FEATURES) for _ in range(layers))).eval()
    factors = []
    with torch.no_grad():
        for layer in model:
            first = torch.randn(FEATURES, RANK, generator=gen) / RANK**0.5
            second = torch.randn(RANK, FEATURES, generator=gen) / FEATURES**0.5
            layer.weight.copy_(first @ second)
            layer.bias.normal_(0, 0.01, generator=gen)
            factors.append((first, second))
    return model, factors


def packed(model: nn.Sequential, factors: list[tuple], bits: int | None, path: Path) -> nn.Module:
    """The artifact of ``model``'s factors at ``bits``, loaded into a fresh model."""
    record = CompressionRecord(
        LowRankLayer(f"{i}.weight", first, second, bits)
        for i, (first, second) in enumerate(factors)
    )
    pack(model, path, lowrank=record)
    fresh = nn.Sequential(*(nn.Linear(FEATURES, FEATURES) for _ in model)).eval()
    return load_into(fresh, path)


def quantized_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )


def sample(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def time_methods(methods: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call, ``reps`` interleaved samples per method."""
    calls = {}
    for name, fn in methods.items():  # warm-up, and the calls that fill a sample
        sample(fn, 2)
        calls[name] = max(1, min(500, round(TARGET_SECONDS / max(sample(fn, 1), 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            samples[name].append(sample(fn, calls[name]))
    return samples


def product_times(layer: nn.Module, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median milliseconds of each product of one PackedLowRank, alone (where the time goes)."""
    if layer.bits is None:
        h = F.linear(x, layer.second)
        products = {
            "second": lambda: F.linear(x, layer.second),
            "first": lambda: F.linear(h, layer.first, layer.bias),
        }
    else:
        h = layer.second.matmul(x)
        products = {
            "second": lambda: layer.second.matmul(x),
            "first": lambda: layer.first.matmul(h),
        }
    samples = time_methods(products, reps)
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def run_model(kind: str, layers: int, batches: list[int], reps: int, tmp: Path) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    dense, factors = factored_model(layers, gen)
    artifacts = {"lowrank_fp32": None, "lowrank_int8": 8}
    methods = {"fp32": dense, "qdynamic": quantized_dynamic(dense)}
    sizes = {"fp32": sum(p.numel() * 4 for p in dense.parameters())}
    for name, bits in artifacts.items():
        path = tmp / f"{kind}_{name}.safetensors"
        methods[name] = packed(dense, factors, bits, path)
        sizes[name] = report(path).file_bytes
    rows = []
    for batch in batches:
        x = torch.randn(batch, FEATURES, generator=gen)
        want = dense(x)
        errors = {
            name: float((model(x) - want).abs().max() / want.abs().max())
            for name, model in methods.items()
        }
        samples = time_methods(
            {name: (lambda model=model, x=x: model(x)) for name, model in methods.items()}, reps
        )
        for name, model in methods.items():
            rows.append(
                {
                    "model": kind,
                    "layers": layers,
                    "batch": batch,
                    "method": name,
                    "ms": 1e3 * statistics.median(samples[name]),
                    "speedup_vs_fp32": statistics.median(
                        b / s for b, s in zip(samples["fp32"], samples[name], strict=True)
                    ),
                    "speedup_vs_qdynamic": statistics.median(
                        b / s for b, s in zip(samples["qdynamic"], samples[name], strict=True)
                    ),
                    "max_rel_error": errors[name],
                    "weight_bytes": sizes.get(name),
                    "products_ms": (
                        product_times(model[0], x, reps) if name.startswith("lowrank") else None
                    ),
                }
            )
        print_batch(rows[-len(methods) :])
    return rows


def print_batch(rows: list[dict]) -> None:
    head = rows[0]
    print(
        f"\n{head['model']} ({head['layers']} x {FEATURES}x{FEATURES}, rank {RANK}), "
        f"batch {head['batch']}"
    )
    print(
        f"  {'method':<13} {'ms':>9} {'vs fp32':>8} {'vs qdyn':>8} {'rel err':>8}  "
        "layer 0 alone: second, first product (ms)"
    )
    for r in rows:
        products = r["products_ms"]
        ops = "" if products is None else f"{products['second']:.3f}, {products['first']:.3f}"
        print(
            f"  {r['method']:<13} {r['ms']:9.3f} {r['speedup_vs_fp32']:7.2f}x "
            f"{r['speedup_vs_qdynamic']:7.2f}x {r['max_rel_error']:8.1e}  {ops}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 64])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowrank_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not compiled_available():
        raise SystemExit("the compiled ops are not loaded; reinstall to build them")
    cpu, llc = cpu_model(), last_level_cache_bytes()
    load_before = os.getloadavg()
    start = busy_seconds()
    print(
        f"CPU {cpu}, last-level cache {llc / 2**20:.0f} MiB, threads {torch.get_num_threads()}, "
        f"load average {load_before[0]:.2f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for kind in args.models:
            rows += run_model(kind, MODELS[kind], args.batches, args.reps, Path(tmp))
    load_after = os.getloadavg()
    end = busy_seconds()
    wall = end[0] - start[0]
    others = max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / wall
    print(
        f"\nload average {load_after[0]:.2f} at the end; other processes used {others:.2f} "
        f"cores on average during the {wall:.0f} s run (of {os.cpu_count()})"
    )
    record = {
        "cpu": cpu,
        "last_level_cache_bytes": llc,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "load_average": {"start": load_before, "end": load_after},
        "other_processes_cores": others,
        "wall_seconds": wall,
        "features": FEATURES,
        "rank": RANK,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
