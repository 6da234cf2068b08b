"""``lightning-compress-artifact``: export a trained run to a packed artifact, time it, report it.

    lightning-compress-artifact export RUN_DIR [--ckpt FILE] [--out FILE] [--bits 8|4]
    lightning-compress-artifact bench RUN_DIR [--artifact FILE] [--batches 1 64 256]
    lightning-compress-artifact report ARTIFACT

A run directory is what ``lightning-compress`` wrote: ``.hydra/config.yaml`` (the composed
config, which rebuilds the architecture) and ``last.ckpt`` (weights and callback states, read
with ``weights_only=True``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_compress.app.build import build_module
from lightning_compress.callbacks import QATCallback
from lightning_compress.export import ArtifactError, compare_packed, pack, report
from lightning_compress.zoo import ClassificationModule

ARTIFACT_NAME = "model.packed.safetensors"
CHECKPOINT_NAME = "last.ckpt"


def load_run(
    run_dir: Path, ckpt: Path | None = None
) -> tuple[DictConfig, Any, ClassificationModule, dict]:
    """The run's config, datamodule (set up), module with trained weights, and checkpoint."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: RUN_DIR must be a lightning-compress run")
    cfg = OmegaConf.load(config)
    ckpt = ckpt or run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found (pass --ckpt)")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    module = build_module(cfg, datamodule)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return cfg, datamodule, module, checkpoint


def restored_qat(
    cfg: DictConfig, module: ClassificationModule, checkpoint: dict
) -> QATCallback | None:
    """The run's QATCallback with its checkpointed state, integers rebuilt; None without QAT."""
    if not cfg.get("qat"):
        return None
    qat = instantiate(cfg.qat)
    state = checkpoint.get("callbacks", {}).get(qat.state_key)
    if state is None:
        raise ValueError(f"the checkpoint holds no state for {qat.state_key}")
    return qat.attach(module, state)


def export(run_dir: Path, ckpt: Path | None, out: Path | None, bits: int) -> Path:
    cfg, _, module, checkpoint = load_run(run_dir, ckpt)
    qat = restored_qat(cfg, module, checkpoint)
    path = pack(module.net, out or run_dir / ARTIFACT_NAME, qat=qat, bits=bits)
    print(report(path))
    return path


def bench(run_dir: Path, artifact: Path | None, batches: list[int], reps: int) -> dict:
    _, datamodule, module, _ = load_run(run_dir)
    measured = compare_packed(
        module.net, artifact or run_dir / ARTIFACT_NAME, datamodule.test_dataloader(), batches, reps
    )
    times = measured.latency_ms
    result = {
        "dense_acc": measured.reference_acc,
        "packed_acc": measured.packed_acc,
        "latency_ms": times,
    }
    print(
        f"test accuracy: dense fp32 weights {100 * result['dense_acc']:.2f}%, "
        f"packed {100 * result['packed_acc']:.2f}%"
    )
    print(f"{'batch':>6} {'dense ms':>10} {'packed ms':>10} {'speed-up':>9}")
    for b in batches:
        d, p = times["dense"][b], times["packed"][b]
        print(f"{b:>6} {d:10.3f} {p:10.3f} {d / p:8.2f}x")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-compress-artifact",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="pack a trained run's checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--bits",
        type=int,
        default=8,
        choices=(4, 8),
        help="post-training bits for runs without QAT",
    )
    p = sub.add_parser("bench", help="latency and accuracy of the artifact against the dense model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--artifact", type=Path)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 64, 256])
    p.add_argument("--reps", type=int, default=15)
    p = sub.add_parser("report", help="per-layer sizes of an artifact")
    p.add_argument("artifact", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            export(args.run_dir, args.ckpt, args.out, args.bits)
        elif args.command == "bench":
            bench(args.run_dir, args.artifact, args.batches, args.reps)
        else:
            print(report(args.artifact))
    except (ArtifactError, FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        print(f"lightning-compress-artifact: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
