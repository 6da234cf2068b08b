"""Zoo models end to end: ``pack`` -> ``load_into(batch_size=b)`` -> ``model(x)`` against fp32.

Issue 14, acceptance 3: the packed model is at least as fast as its fp32 self at batch 1 and 32,
for every model and sparsity. Models, random-initialised from a fixed seed, in eval mode:

- ``lenet300``      LeNet-300-100 on 1x28x28
- ``lenet5``        LeNet-5 (Caffe variant) on 1x28x28
- ``tiny_encoder``  :class:`~lightning_compress.zoo.models.TinyEncoder`, hidden 128, 2 blocks,
                    32 tokens (nn.MultiheadAttention and its out_proj stay fp32, see ``kept``)
- ``resnet18``      torchvision's ResNet-18 layout, 10 classes, on 3x32x32

For each sparsity, every layer that packing may replace (:func:`plan_layers`) has its smallest
``|w|`` zeroed (per layer), the model is packed with ``bits=8``, and for each batch size the
artifact is loaded into a copy with ``load_into(copy, path, batch_size=b, example=x)`` (each
layer gets the implementation measured fastest on this machine, or stays fp32), timed against
the fp32 model with :func:`lightning_compress.export.measure.latency` (the models take turns;
medians). Printed per row: both medians, the ratio fp32 / packed, the largest absolute output
difference, and the implementation each packed layer got; per model, what ``report`` says
was packed and what was kept fp32 and why.

Written against the ``load_into`` of issue 14: ``batch_size``, ``example`` and ``latency`` are
passed only where its signature has them, so the script also runs (plain kernels) without.

    python benchmarks/models.py [--threads 2] [--reps 7] [--sparsities 0 0.5 0.9]
        [--batches 1 32] [--models ...] [--exact] [--cache PATH] [--out ...]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import tempfile
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lowrank_speed import busy_seconds, cpu_model  # the sibling benchmark script
from torch import nn

from lightning_compress.export import load_into, pack, plan_layers, report
from lightning_compress.export.measure import latency
from lightning_compress.ops import compiled_available
from lightning_compress.zoo import LeNet5, LeNet300100, ResNet18, TinyEncoder

VOCAB, TOKENS = 1000, 32

# name -> (constructor, batch -> one seeded input of that batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], torch.Tensor]]]
MODELS = {
    "lenet300": (LeNet300100, lambda b, g: torch.randn(b, 1, 28, 28, generator=g)),
    "lenet5": (LeNet5, lambda b, g: torch.randn(b, 1, 28, 28, generator=g)),
    "tiny_encoder": (
        lambda: TinyEncoder(vocab=VOCAB, seq_len=TOKENS, hidden=128),
        lambda b, g: torch.randint(0, VOCAB, (b, TOKENS), generator=g),
    ),
    "resnet18": (
        lambda: ResNet18(num_classes=10),
        lambda b, g: torch.randn(b, 3, 32, 32, generator=g),
    ),
}


def magnitude_pruned(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of ``model`` whose packable layers each have their smallest ``|w|`` zeroed, the
    exact count ``round(sparsity * numel)`` per layer (ties broken by position)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer in plan_layers(model).packable.values():
            w = layer.weight
            drop = round(sparsity * w.numel())
            if drop:
                w.view(-1)[w.abs().flatten().argsort(stable=True)[:drop]] = 0
    return model


def loader_options(
    batch: int, example: torch.Tensor, table: Any, exact: bool = False
) -> dict[str, Any]:
    """The keyword arguments of issue 14's ``load_into`` that this build's signature has."""
    params = inspect.signature(load_into).parameters
    wanted = {"batch_size": batch, "example": example, "latency": table, "exact": exact or None}
    return {k: v for k, v in wanted.items() if k in params and v is not None}


def latency_table(cache: Path | None, tmp: Path) -> Any:
    """A latency table at ``cache`` (None: a fresh one, so this run measures on this machine),
    or None where this build has no latency model."""
    try:
        from lightning_compress.export.latency import LatencyTable
    except ImportError:
        return None
    return LatencyTable(cache if cache is not None else tmp / "latency.json")


def implementations(packed: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per packed layer: its module's type, the implementation it got (``impl``; "kernel" where
    the module has none) and the milliseconds measured per candidate (``latency_ms``)."""
    out = {}
    for name in names:
        module = packed.get_submodule(name)
        times = getattr(module, "latency_ms", None)
        out[name] = {
            "module": type(module).__name__,
            "impl": getattr(module, "impl", "kernel"),
            "candidates_ms": None if times is None else {k: float(v) for k, v in times.items()},
        }
    return out


def artifact_summary(path: Path) -> dict[str, Any]:
    """What ``report`` says of the artifact: bytes, packed layers, kept layers and why."""
    rep = report(path)
    return {
        "file_bytes": rep.file_bytes,
        "fp32_bytes": rep.fp32_bytes,
        "packed": [
            {"name": r.name, "bits": r.bits, "layout": r.layout, "sparsity": r.sparsity}
            for r in rep.layers
        ],
        "kept": [{"name": u.name, "type": u.type, "reason": u.reason} for u in rep.unpacked or []],
        "text": str(rep),
    }


def other_cores(start: tuple[float, ...], end: tuple[float, ...]) -> float:
    """Cores other processes kept busy on average between two :func:`busy_seconds` readings
    (on a shared machine, a row they took a core from is slower than the code is)."""
    return max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / max(end[0] - start[0], 1e-9)


def run_model(name: str, args: argparse.Namespace, table: Any, tmp: Path) -> list[dict]:
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    base = build().eval()
    rows = []
    for sparsity in args.sparsities:
        model = magnitude_pruned(base, sparsity)
        path = pack(model, tmp / f"{name}_{sparsity}.safetensors", bits=8)
        art = artifact_summary(path)
        if sparsity == args.sparsities[0]:
            print(f"\n{name}: report of the {sparsity:.0%} artifact\n{art['text']}")
        print(
            f"\n{name} at {sparsity:.0%}: {art['file_bytes']:,} B on disk, "
            f"{art['fp32_bytes'] / max(art['file_bytes'], 1):.1f}x smaller than its fp32 tensors; "
            f"{len(art['packed'])} layers packed, {len(art['kept'])} kept fp32"
        )
        names = [r["name"] for r in art["packed"]]
        for batch in args.batches:
            x = inputs(batch, torch.Generator().manual_seed(1))
            options = loader_options(batch, x, table, args.exact)
            before = busy_seconds()
            packed = load_into(copy.deepcopy(model), path, **options)
            load_s = busy_seconds()[0] - before[0]
            ms = latency({"fp32": model, "packed": packed}, x, [batch], args.reps)
            others = other_cores(before, busy_seconds())
            fp32_ms, packed_ms = ms["fp32"][batch], ms["packed"][batch]
            diff = float((packed(x) - model(x)).abs().max())
            impls = implementations(packed, names)
            rows.append(
                {
                    "model": name,
                    "sparsity": sparsity,
                    "batch": batch,
                    "fp32_ms": fp32_ms,
                    "packed_ms": packed_ms,
                    "ratio": fp32_ms / packed_ms,
                    "max_abs_diff": diff,
                    "max_abs_output": float(model(x).abs().max()),
                    "other_processes_cores": others,
                    "load_into_seconds": load_s,
                    "impls": dict(Counter(v["impl"] for v in impls.values())),
                    "layers": impls,
                    "file_bytes": art["file_bytes"],
                    "fp32_bytes": art["fp32_bytes"],
                    "kept": art["kept"],
                }
            )
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    flag = "" if row["ratio"] >= 1.0 else "  < 1.0x"
    print(
        f"  batch {row['batch']:>3}: fp32 {row['fp32_ms']:8.3f} ms, packed {row['packed_ms']:8.3f} "
        f"ms, {row['ratio']:5.2f}x, max |diff| {row['max_abs_diff']:.2e} "
        f"(outputs up to {row['max_abs_output']:.2f}), load_into {row['load_into_seconds']:.1f} s, "
        f"others used {row['other_processes_cores']:.2f} cores{flag}"
    )
    layers = " ".join(f"{n}={v['impl']}" for n, v in row["layers"].items())
    print(textwrap.fill(layers, 100, initial_indent="    ", subsequent_indent="    "))


def print_summary(rows: list[dict], batches: list[int]) -> None:
    print("\nfp32 / packed (>= 1.0 wanted)")
    print(f"  {'model':<13} {'sparsity':>8} " + " ".join(f"{'b=' + str(b):>7}" for b in batches))
    keys = dict.fromkeys((r["model"], r["sparsity"]) for r in rows)
    for model, sparsity in keys:
        ratios = {
            r["batch"]: r["ratio"]
            for r in rows
            if r["model"] == model and r["sparsity"] == sparsity
        }
        cells = " ".join(f"{ratios[b]:6.2f}x" for b in batches)
        print(f"  {model:<13} {sparsity:>7.0%} {cells}")
    below = [r for r in rows if r["ratio"] < 1.0]
    print(f"  {len(below)} of {len(rows)} combinations below 1.0x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.0, 0.5, 0.9])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--exact", action="store_true", help="load_into(exact=True)")
    parser.add_argument("--cache", type=Path, help="latency table to use and extend")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models.json"))
    args = parser.parse_args()
    if any(not 0.0 <= s < 1.0 for s in args.sparsities):
        raise SystemExit(f"`--sparsities` must be in [0, 1), got {args.sparsities}")
    torch.set_num_threads(args.threads)
    if not compiled_available():
        raise SystemExit("the compiled ops are not loaded; reinstall to build them")
    cpu, load_before, start = cpu_model(), os.getloadavg(), busy_seconds()
    print(
        f"CPU {cpu}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"load average {load_before[0]:.2f}; load_into options: "
        f"{sorted(loader_options(1, torch.zeros(1), object(), args.exact))}"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        table = latency_table(args.cache, Path(tmp))
        for name in args.models:
            rows += run_model(name, args, table, Path(tmp))
            write(args, cpu, load_before, start, rows, complete=name == args.models[-1])
    print_summary(rows, args.batches)
    end = busy_seconds()
    print(
        f"\nload average {os.getloadavg()[0]:.2f} at the end; other processes used "
        f"{other_cores(start, end):.2f} cores on average during the {end[0] - start[0]:.0f} s "
        f"run (of {os.cpu_count()})"
    )
    print(f"wrote {args.out}")


def write(
    args: argparse.Namespace,
    cpu: str,
    load_before: tuple[float, float, float],
    start: tuple[float, float, float],
    rows: list[dict],
    complete: bool,
) -> None:
    """The record so far, rewritten after each model: a run cut short keeps what it measured."""
    end = busy_seconds()
    record = {
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "exact": args.exact,
        "complete": complete,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "other_processes_cores": other_cores(start, end),
        "wall_seconds": end[0] - start[0],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
