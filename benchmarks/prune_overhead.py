"""Epoch time with PruneCallback (cubic schedule, masks enforced every step) over plain training.

With ``--callback flipout`` the callback is FlipOut instead: an iterative schedule halving the
survivors every epoch, sign flips counted and gradient noise added at every optimizer step. With
``--callback qat`` it is QATCallback (int8 weights per channel, int8 activations). With
``--callback lowrank`` it is LowRankCallback holding every layer at a sixth of its parameters
from the first step (``schedule="oneshot"``, ``start=0``), trained as ``--method projected``
(the real weight, retracted to its rank after every step) or ``--method factored`` (the two
factors).

Plain and pruned runs alternate in one process so both see the same machine load; each run
trains a few epochs and the first (warm-up) epoch is dropped. The ratio of medians is reported
for LeNet-300-100 and a wide MLP (784-4096-4096-10) on the mnist5k training split.

    python benchmarks/prune_overhead.py [--reps 5] [--callback magnitude|flipout|qat|lowrank]
        [--method projected|factored] [--out ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_compress import LowRankCallback, PruneCallback, QATCallback
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t0)


def make_module(width: int | None) -> ClassificationModule:
    hidden = (300, 100) if width is None else (width, width)
    net = LeNet300100(hidden=hidden)
    opt = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)
    return ClassificationModule(net, optimizer=opt)


def cpu_model() -> str:
    """The CPU's model name, as lscpu (else /proc/cpuinfo) gives it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = Path("/proc/cpuinfo").read_text()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def make_callback(criterion: str, epochs: int, every: str, method: str) -> pl.Callback:
    if criterion == "lowrank":
        # The ranks are held from the first step: the cost of training at low rank, no ramp.
        return LowRankCallback(params=1 / 6, schedule="oneshot", start=0, method=method)
    if criterion == "qat":
        return QATCallback(bits=8, activations=8)
    if criterion == "flipout":
        return PruneCallback(
            sparsity=1 - 0.5 ** (epochs - 1),
            schedule="iterative",
            rate=0.5,
            start="1ep",
            every="1ep",
            criterion="flipout",
        )
    # Masks change every `every` (cubic ramp over the measured epochs) and are enforced at
    # every optimizer step.
    return PruneCallback(
        sparsity=0.9, schedule="cubic", start=0, end=f"{epochs - 1}ep", every=every
    )


def bench_trainer(epochs: int, batches: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU Trainer that only trains: no validation, logger, checkpoints or progress bar."""
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        accelerator="cpu",
    )


def one_run(
    width: int | None,
    pruned: bool,
    epochs: int,
    batches: int,
    every: str,
    criterion: str,
    method: str,
) -> list[float]:
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer]
    if pruned:
        callbacks.append(make_callback(criterion, epochs, every, method))
    trainer = bench_trainer(epochs, batches, callbacks)
    dm = MNIST5k(batch_size=64, shift=0)
    trainer.fit(make_module(width), datamodule=dm)
    return timer.times[1:]  # the first epoch warms up allocators and caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", default="1ep", help="steps between mask updates")
    parser.add_argument(
        "--callback",
        "--criterion",
        dest="criterion",
        default="magnitude",
        choices=["magnitude", "flipout", "qat", "lowrank"],
    )
    parser.add_argument(
        "--method", default="projected", choices=["projected", "factored"], help="lowrank only"
    )
    parser.add_argument("--models", default="lenet300,wide4096", help="comma-separated cases")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out is None:
        stem = {"magnitude": "prune", "flipout": "flipout", "qat": "qat"}.get(args.criterion)
        stem = f"{stem or f'lowrank_{args.method}'}_overhead"
        args.out = Path(f"benchmarks/results/{stem}.json")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_compress").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    cpu, load = cpu_model(), os.getloadavg()
    # Other jobs on the machine slow both arms alike (they alternate) but widen the spread.
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, load average {load}")
    known = {"lenet300": (None, 55), "wide4096": (4096, 55)}
    cases = {name: known[name] for name in args.models.split(",")}
    results = {}
    for name, (width, batches) in cases.items():
        plain: list[float] = []
        pruned: list[float] = []
        run = functools.partial(
            one_run,
            width,
            epochs=args.epochs,
            batches=batches,
            every=args.every,
            criterion=args.criterion,
            method=args.method,
        )
        for _ in range(args.reps):
            plain += run(pruned=False)
            pruned += run(pruned=True)
        ratio = statistics.median(pruned) / statistics.median(plain)
        results[name] = {
            "batches_per_epoch": batches,
            "plain_epoch_s": plain,
            "pruned_epoch_s": pruned,
            "median_plain_s": statistics.median(plain),
            "median_pruned_s": statistics.median(pruned),
            "ratio": ratio,
        }
        print(
            f"{name:10s} plain {statistics.median(plain):.3f}s  pruned "
            f"{statistics.median(pruned):.3f}s  ratio {ratio:.3f}  (n={len(plain)} epochs each)"
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu": cpu,
        "load_average": {"start": load, "end": os.getloadavg()},
        "reps": args.reps,
        "every": args.every,
        "criterion": args.criterion,
        **({"method": args.method} if args.criterion == "lowrank" else {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
