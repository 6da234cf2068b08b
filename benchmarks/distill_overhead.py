"""Epoch time with DistillationCallback over plain training, with and without precomputed
(memoized) teacher outputs.

Student LeNet-300-100, teacher the recipes' 784-1200-1200-10 MLP, on the mnist5k training split
without augmentation (a fixed training set, which is what ``precompute=True`` needs). Plain,
distilled and distilled-with-memo runs alternate in one process so all see the same machine
load; each trains a few epochs. Steady-state epochs (all but the first) give the median ratios;
the first epoch, where the memo is filled, is reported separately.

    python benchmarks/distill_overhead.py [--reps 5] [--epochs 3] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from prune_overhead import EpochTimer, bench_trainer, make_module

from lightning_compress import DistillationCallback
from lightning_compress.zoo import LeNet300100, MNIST5k

MODES = ("plain", "distill", "precomputed")


def one_run(mode: str, epochs: int, batches: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer]
    if mode != "plain":
        teacher = LeNet300100(hidden=(1200, 1200), dropout=0.5)
        callbacks.append(DistillationCallback(teacher, precompute=mode == "precomputed"))
    trainer = bench_trainer(epochs, batches, callbacks)
    trainer.fit(make_module(None), datamodule=MNIST5k(batch_size=64, shift=0))
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/distill_overhead.json")
    )
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    batches = 55  # the whole training split: 3,500 images in batches of 64
    first: dict[str, list[float]] = {m: [] for m in MODES}
    steady: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.reps):
        for mode in MODES:
            times = one_run(mode, args.epochs, batches)
            first[mode].append(times[0])
            steady[mode] += times[1:]
    median = {m: statistics.median(steady[m]) for m in MODES}
    median_first = {m: statistics.median(first[m]) for m in MODES}
    results = {
        "epoch_s": steady,
        "first_epoch_s": first,
        "median_epoch_s": median,
        "median_first_epoch_s": median_first,
        "ratio_distill": median["distill"] / median["plain"],
        "ratio_precomputed": median["precomputed"] / median["plain"],
        "ratio_precomputed_first_epoch": median_first["precomputed"] / median_first["plain"],
    }
    for mode in MODES:
        print(f"{mode:12s} epoch {median[mode]:.3f}s (first epoch {median_first[mode]:.3f}s)")
    print(
        f"distill / plain {results['ratio_distill']:.3f}   precomputed / plain "
        f"{results['ratio_precomputed']:.3f} (first epoch "
        f"{results['ratio_precomputed_first_epoch']:.3f})"
    )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "reps": args.reps,
        "epochs": args.epochs,
        "batches_per_epoch": batches,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
