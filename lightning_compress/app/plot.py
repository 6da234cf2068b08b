"""``lightning-compress-plot``: accuracy against sparsity from a sweep's ``results.json`` files.

    lightning-compress -m recipe=sparsity_sweep
    lightning-compress-plot multirun/<time> --out sweep.png [--wandb]

Runs are grouped by name; each point is the mean over seeds at one sparsity, with the spread of
the seeds as an error bar. With ``--wandb`` (or when W&B is importable and ``--wandb`` is given)
the PNG and the table are logged to a W&B run, offline unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

METRIC = "test/acc"


def load_records(root: Path) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``root``.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no record.
        ValueError: A record that is not valid JSON or lacks the fields the plot needs.
    """
    if not root.exists():
        raise FileNotFoundError(f"{str(root)!r} does not exist")
    paths = sorted(root.rglob("results.json"))
    if not paths:
        raise FileNotFoundError(f"no results.json under {str(root)!r}")
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if "sparsity" not in record or METRIC not in record.get("metrics", {}):
            raise ValueError(f"{path}: needs 'sparsity' and metrics[{METRIC!r}]")
        records.append(record)
    return records


def summarise(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per run name: (sparsity, mean accuracy, seed std, seeds) sorted by sparsity."""
    groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        name = r.get("config", {}).get("name", "run")
        groups[name][round(r["sparsity"], 4)].append(100.0 * r["metrics"][METRIC])
    out = {}
    for name, by_sparsity in groups.items():
        rows = []
        for s, accs in sorted(by_sparsity.items()):
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append((s, statistics.mean(accs), std, len(accs)))
        out[name] = rows
    return out


def plot(summary: dict[str, list[tuple[float, float, float, int]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in summary.items():
        remaining = [100.0 * (1.0 - s) for s, *_ in rows]
        ax.errorbar(
            remaining,
            [m for _, m, _, _ in rows],
            yerr=[e for *_, e, _ in rows],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set_xscale("log")
    ticks = sorted({round(100.0 * (1.0 - s), 2) for rows in summary.values() for s, *_ in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def log_to_wandb(summary: dict[str, list[tuple[float, float, float, int]]], png: Path) -> None:
    import wandb

    run = wandb.init(project="lightning-compress", job_type="sweep-plot", mode="offline")
    table = wandb.Table(columns=["run", "sparsity", "accuracy_mean", "accuracy_std", "seeds"])
    for name, rows in summary.items():
        for row in rows:
            table.add_data(name, *row)
    run.log({"sweep/accuracy_vs_sparsity": wandb.Image(str(png)), "sweep/table": table})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a sweep directory (searched recursively)")
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: <root>/sweep.png)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log the plot and table to W&B")
    args = parser.parse_args(argv)
    try:
        summary = summarise(load_records(args.root))
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-compress-plot: {err}", file=sys.stderr)
        return 2
    png = plot(summary, args.out or args.root / "sweep.png")
    for name, rows in summary.items():
        for s, mean, std, n in rows:
            print(f"{name:28s} sparsity {100 * s:6.2f}%  accuracy {mean:6.2f} +- {std:.2f} ({n})")
    print(f"wrote {png}")
    if args.wandb:
        log_to_wandb(summary, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
