"""The whole search's cost against one plain training run of the same model.

Runs the app (`lightning-compress`) alternately without callbacks and with `search=proxyless`
(or `--method greedy`), the same epochs, seed and data, packing and testing off, and reads each
run's wall time (fit, including the search's latency measurements in `setup`). Reports the
ratio per pair and its median, with the CPU model.

    python benchmarks/search_cost.py [--reps 3] [--method proxyless|greedy] [--budget 0.75xint8]
        [--batch 256] [--model lenet300] [--out benchmarks/results/search_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning_compress.export.latency import cpu_model

APP = [sys.executable, "-m", "lightning_compress.app.main"]


def wall_time(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                *APP,
                *overrides,
                "logger=none",
                "export.pack=false",
                "test_after_fit=false",
                f"hydra.run.dir={tmp}",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(json.loads((Path(tmp) / "results.json").read_text())["wall_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--method", choices=["proxyless", "greedy"], default="proxyless")
    parser.add_argument("--budget", default="0.75xint8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_cost.json"))
    args = parser.parse_args()
    base = ["prune=none", "qat=none", f"model={args.model}"]
    search = [
        *base,
        f"search={args.method}",
        f"search.budget={args.budget}",
        f"search.batch_size={args.batch}",
    ]
    pairs = []
    for rep in range(args.reps):
        plain, searched = wall_time(base), wall_time(search)
        pairs.append({"plain_s": plain, "search_s": searched, "ratio": searched / plain})
        print(f"rep {rep}: plain {plain:.1f} s, search {searched:.1f} s ({searched / plain:.2f}x)")
    ratio = statistics.median(p["ratio"] for p in pairs)
    result = {
        "cpu": cpu_model(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "pairs": pairs,
        "median_ratio": ratio,
    }
    print(f"{cpu_model()}: the search costs {ratio:.2f}x one plain training run (median)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
