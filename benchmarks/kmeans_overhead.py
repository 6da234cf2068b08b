"""Peak memory and step time of weight sharing (QATCallback(scheme="kmeans")) over plain training.

The 784-4096-4096-10 MLP (SGD with momentum, batch 64, random inputs) trains a few dozen steps
in a fresh process per setting, so each process's peak resident memory is its own; the memory
figure is the peak RSS above the RSS just before the model is built (weights, gradients,
momentum, activations, the callback's state and temporaries). Step time is the median over the
steps after the warm-up; the clustering at step 0 (in ``on_train_start``) is timed on its own as
``start_s``. Settings alternate
across repetitions so they see the same machine load.

    python benchmarks/kmeans_overhead.py [--reps 3] [--steps 30] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "plain": None,
    "kmeans4": {"scheme": "kmeans", "bits": 4, "activations": None},
    "kmeans4_groups2": {"scheme": "kmeans", "bits": 4, "groups": 2, "activations": None},
    "uniform4": {"bits": 4, "activations": None},
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(setting: str, steps: int) -> dict:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import QATCallback

    torch.set_num_threads(2)
    before = rss_mib()

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = (
                nn.Linear(784, 4096),
                nn.Linear(4096, 4096),
                nn.Linear(4096, 10),
            )

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(
                torch.randn(64 * steps, 784, generator=g),
                torch.randint(0, 10, (64 * steps,), generator=g),
            )
            return DataLoader(data, batch_size=64)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cluster_s = 0.0

        def on_train_start(self, *args) -> None:
            self._t0 = time.perf_counter()  # the callbacks after this one cluster here

        def on_train_batch_start(self, *args) -> None:
            if not self.times and not self.cluster_s:
                self.cluster_s = time.perf_counter() - self._t0
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter() - self._t0)

    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = [timer]
    if SETTINGS[setting] is not None:
        callbacks.append(QATCallback(**SETTINGS[setting]))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        accelerator="cpu",
    )
    trainer.fit(MLP())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "setting": setting,
        "peak_mib_above_start": peak - before,
        "peak_rss_mib": peak,
        "first_step_s": timer.times[0],
        "start_s": timer.cluster_s,  # from on_train_start to the first batch: the clustering
        "step_s": statistics.median(timer.times[5:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--out", default="benchmarks/results/kmeans_overhead.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from prune_overhead import cpu_model

    rows: dict[str, list[dict]] = {s: [] for s in args.settings}
    for _ in range(args.reps):
        for setting in args.settings:
            out = subprocess.run(
                [sys.executable, __file__, "--child", setting, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[setting][-1], flush=True)
    summary = {
        s: {
            "peak_mib_above_start": statistics.median(r["peak_mib_above_start"] for r in rs),
            "step_s": statistics.median(r["step_s"] for r in rs),
            "first_step_s": statistics.median(r["first_step_s"] for r in rs),
            "start_s": statistics.median(r["start_s"] for r in rs),
        }
        for s, rs in rows.items()
    }
    plain = summary.get("plain")
    if plain:
        for v in summary.values():
            v["memory_x_plain"] = v["peak_mib_above_start"] / plain["peak_mib_above_start"]
            v["time_x_plain"] = v["step_s"] / plain["step_s"]
    result = {"cpu": cpu_model(), "threads": 2, "summary": summary, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"cpu": result["cpu"], "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
