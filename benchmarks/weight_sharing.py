"""Weight sharing (k-means codebooks) against uniform integer QAT, and the Deep Compression recipes.

Every run is the ``lightning-compress`` app (train, pack, reload, evaluate on mnist5k's test
split), seeds 0-2; a row is the mean over seeds of the test accuracy and of the packed file's
bytes, with the ratio to the fp32 safetensors file, against the dense model trained the same way
(same epochs, optimizer and schedule: ``recipe=lenet300_dense`` / ``lenet5_dense``).

- ``--table widths``: LeNet-300-100 pruned as ``recipe=deep_compression_lenet300`` prunes it,
  weights shared (the recipe's k-means sharing at ``qat.bits=b``) or uniformly quantized
  (``qat=int4`` with ``qat.bits=b``, per output channel, float activations like the shared
  runs) from the same step, at 2, 3 and 4 bits.
- ``--table recipes``: ``recipe=deep_compression_lenet300`` and ``deep_compression_lenet5``
  against their dense baselines.

    python benchmarks/weight_sharing.py [--table widths recipes] [--seeds 0 1 2]
        [--out benchmarks/results/weight_sharing.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning_compress.export.latency import cpu_model

APP = Path(sys.executable).with_name("lightning-compress")


def run(overrides: list[str], seed: int, where: Path) -> dict:
    """One app run; its results.json."""
    out = where / f"run-{abs(hash((tuple(overrides), seed)))}"
    cmd = [str(APP), *overrides, f"seed={seed}", "logger=none", f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return results


def row(label: str, overrides: list[str], seeds: list[int], where: Path) -> dict:
    runs = [run(overrides, s, where) for s in seeds]
    accs = [100 * r["metrics"]["test/acc"] for r in runs]
    packed = [r["packed"]["bytes"] for r in runs if r.get("packed")]
    fp32 = runs[0]["model_bytes"]
    out = {
        "label": label,
        "overrides": overrides,
        "test_acc": accs,
        "mean_acc": statistics.fmean(accs),
        "packed_bytes": packed,
        "mean_packed_bytes": statistics.fmean(packed) if packed else None,
        "fp32_bytes": fp32,
        "ratio": fp32 / statistics.fmean(packed) if packed else None,
        "sparsity": statistics.fmean(r["sparsity"] for r in runs),
    }
    ratio = f"{out['ratio']:.1f}x" if packed else "-"
    print(
        f"{label:34s} acc {'/'.join(f'{a:.1f}' for a in accs)} mean {out['mean_acc']:.2f}%  "
        f"packed {out['mean_packed_bytes'] or 0:9,.0f} B  {ratio:>6s}  "
        f"sparsity {100 * out['sparsity']:.1f}%",
        flush=True,
    )
    return out


def widths(seeds: list[int], where: Path) -> list[dict]:
    base = ["recipe=deep_compression_lenet300"]
    rows = [row("dense fp32 (lenet300_dense)", ["recipe=lenet300_dense"], seeds, where)]
    for bits in (2, 3, 4):
        rows.append(row(f"k-means {bits}-bit", [*base, f"qat.bits={bits}"], seeds, where))
        uniform = [
            *base,
            "qat=int4",
            f"qat.bits={bits}",
            "qat.activations=null",
            "qat.refresh=null",
        ]
        rows.append(row(f"uniform int{bits}", uniform, seeds, where))
    return rows


def recipes(seeds: list[int], where: Path) -> list[dict]:
    return [
        row("dense fp32 (lenet300_dense)", ["recipe=lenet300_dense"], seeds, where),
        row("deep_compression_lenet300", ["recipe=deep_compression_lenet300"], seeds, where),
        row("dense fp32 (lenet5_dense)", ["recipe=lenet5_dense"], seeds, where),
        row("deep_compression_lenet5", ["recipe=deep_compression_lenet5"], seeds, where),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", nargs="+", default=["widths", "recipes"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "weight_sharing.json"
    )
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; seeds {args.seeds}; mnist5k test split")
    tables = {"widths": widths, "recipes": recipes}
    result: dict = {"cpu": cpu_model(), "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.table:
            print(f"== {name} ==")
            result[name] = tables[name](args.seeds, Path(tmp))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
