"""Entry point of ``lightning-compress``: train, test, record ``results.json``, print a summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file

from lightning_compress.app.artifact import ARTIFACT_NAME, CHECKPOINT_NAME
from lightning_compress.app.build import Job, build_job
from lightning_compress.callbacks import LowRankCallback, QATCallback
from lightning_compress.export import compare_packed, pack
from lightning_compress.search import SearchCallback
from lightning_compress.targets import default_weights

log = logging.getLogger(__name__)


class ConfigurationError(Exception):
    """The composed config cannot make a run (bad value, missing file, unknown name)."""


def config_dir() -> Path:
    """The directory holding ``config.yaml`` and the config groups, recipes as the ``recipe`` group.

    An installed wheel ships the repository's ``configs/`` and ``recipes/`` as the data package
    ``lightning_compress._configs`` (see setup.py); an editable install reads them from the
    source tree, where ``configs/recipe`` links ``recipes/``.
    """
    package = Path(__file__).resolve().parents[1]
    shipped = package / "_configs"
    return shipped if shipped.is_dir() else package.parent / "configs"


def model_file_bytes(model: torch.nn.Module, path: Path) -> int:
    """Writes the model's weights as safetensors and returns the file's size on disk."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    return path.stat().st_size


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """All parameters, and the Linear/Conv/attention weights that compression targets."""
    params = dict(model.named_parameters())
    weights = [params[n] for n in default_weights(model)]
    return {
        "total": sum(p.numel() for p in params.values()),
        "nonzero": sum(int(torch.count_nonzero(p.detach())) for p in params.values()),
        "weights": sum(p.numel() for p in weights),
        "weights_nonzero": sum(int(torch.count_nonzero(p.detach())) for p in weights),
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not torch.is_tensor(v) or v.numel() == 1}


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Runs one job and writes ``results.json`` into ``output_dir``.

    Returns:
        The record written to ``results.json``.
    """
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        job = build_job(cfg)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        ImportError,
        OmegaConfBaseException,
        InstantiationException,
        MisconfigurationException,
    ) as err:
        raise ConfigurationError(str(err)) from err
    trainer = job.trainer
    trainer.fit(job.module, datamodule=job.datamodule)
    # Kept before testing, which replaces the trainer's metrics with the test split's.
    metrics = _scalars(trainer.callback_metrics)
    if cfg.get("test_after_fit", True):
        for result in trainer.test(job.module, datamodule=job.datamodule, verbose=False):
            metrics.update(_scalars(result))
    output_dir.mkdir(parents=True, exist_ok=True)
    # Weights and callback states, for `lightning-compress-artifact export` (every rank calls it).
    trainer.save_checkpoint(output_dir / CHECKPOINT_NAME)
    params = parameter_counts(job.module.net)
    record = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "metrics": dict(sorted(metrics.items())),
        "parameters": params,
        "sparsity": 1.0 - params["weights_nonzero"] / max(1, params["weights"]),
        "model_bytes": model_file_bytes(job.module.net, output_dir / "model.safetensors"),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "global_step": trainer.global_step,
        # Iterative schedules: sparsity and monitored metric at the end of every round.
        "rounds": [r for c in job.callbacks for r in getattr(c, "rounds", [])],
        # Per factored weight: rank, full rank, parameters at that rank and dense.
        "lowrank": [
            r for c in job.callbacks if isinstance(c, LowRankCallback) for r in c.layer_stats()
        ],
    }
    export = cfg.get("export") or {}
    if export.get("pack", False) and trainer.is_global_zero:
        record["packed"] = pack_and_measure(job, output_dir, export)
    _finish_logger(job.logger)
    if trainer.is_global_zero:
        (output_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        print(summary(record, output_dir))
    return record


def pack_and_measure(job: Job, output_dir: Path, export: Any) -> dict[str, Any]:
    """Packs the trained network, reloads it into a copy with the compiled kernels, evaluates the
    copy on the test split and times it against the network with its fp32 weights."""
    qat = next((c for c in job.callbacks if isinstance(c, QATCallback) and c.record), None)
    search = next(
        (c for c in job.callbacks if isinstance(c, SearchCallback) and c.record is not None), None
    )
    if search is not None and qat is not None:
        raise ValueError("a SearchCallback chose the layers' bits: run it with `qat=none`")
    lowrank = next(
        (c for c in job.callbacks if isinstance(c, LowRankCallback) and c.constrained()), None
    )
    net = job.module.net
    bits = export.get("bits", 8)
    path = pack(
        net,
        output_dir / ARTIFACT_NAME,
        qat=qat if search is None else (search if len(search.record or ()) else None),
        # The search chose each layer's bits: a layer it left fp32 stays fp32.
        bits=bits if search is None else None,
        # Without QAT the factors take the post-training bits like every other packed layer;
        # after QAT each takes its layer's QAT bits (fp32 where QAT left the layer alone).
        lowrank=lowrank.to_record(None if qat is not None else bits) if lowrank else None,
    )
    if search is not None:
        search.remove()  # as QAT below: the float network is the baseline
    if qat is not None:
        qat.remove()  # the float network is the latency baseline; `installed()` scores as trained
    measured = compare_packed(
        net,
        path,
        job.datamodule.test_dataloader(),
        [int(b) for b in export.get("latency_batches", [1, 256])],
        # The model as trained: fake-quantized weights and activations.
        reference=(
            qat.layers.installed()
            if qat is not None and qat.layers is not None
            else search.installed()
            if search is not None
            else None
        ),
    )
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "quantization": "qat"
        if qat is not None
        else "search"
        if search is not None
        else f"post-training int{bits}",
        "test_acc": measured.packed_acc,
        # The same test split through the unpacked network: fake-quantized after QAT, else fp32.
        "reference_acc": measured.reference_acc,
        "latency_ms": measured.latency_ms,
    }


def summary(record: dict[str, Any], output_dir: Path) -> str:
    m = record["metrics"]
    params = record["parameters"]
    lines = [
        f"== {record['config'].get('name', 'run')} ==",
        f"test accuracy  {100 * m['test/acc']:.2f}%" if "test/acc" in m else "test accuracy  n/a",
        f"parameters     {params['nonzero']:,} non-zero of {params['total']:,}",
        f"weight sparsity {100 * record['sparsity']:.2f}% of Linear/Conv weights are zero",
        f"model file     {record['model_bytes']:,} bytes (safetensors)",
        *_lowrank_lines(record),
        *_packed_lines(record),
        f"wall time      {record['wall_time_s']:.1f} s, {record['global_step']} optimizer steps",
        f"record         {output_dir / 'results.json'}",
    ]
    return "\n".join(lines)


def _lowrank_lines(record: dict[str, Any]) -> list[str]:
    rows = record.get("lowrank")
    if not rows:
        return []
    params, dense = sum(r["params"] for r in rows), sum(r["dense"] for r in rows)
    ranks = ", ".join(f"{r['layer']} {r['rank']}/{r['full_rank']}" for r in rows)
    return [
        f"low rank       {params:,} of {dense:,} parameters in factors ({dense / params:.1f}x): "
        f"rank {ranks}"
    ]


def _packed_lines(record: dict[str, Any]) -> list[str]:
    packed = record.get("packed")
    if not packed:
        return []
    trained = "fake-quantized" if packed["quantization"] in ("qat", "search") else "fp32"
    lines = [
        f"packed file    {packed['bytes']:,} bytes, {record['model_bytes'] / packed['bytes']:.1f}x "
        f"smaller ({packed['quantization']}, {Path(packed['path']).name})",
        f"packed acc.    {100 * packed['test_acc']:.2f}% reloaded with load_into, whole test split "
        f"({trained} model before packing: {100 * packed['reference_acc']:.2f}%)",
    ]
    for batch, dense_ms in packed["latency_ms"]["dense"].items():
        packed_ms = packed["latency_ms"]["packed"][batch]
        lines.append(
            f"latency b={batch:<4} dense fp32 {dense_ms:.3f} ms, packed {packed_ms:.3f} ms "
            f"({dense_ms / packed_ms:.2f}x)"
        )
    return lines


def _finish_logger(logger: Any) -> None:
    # Sequential sweep jobs share one process: close the W&B run so the next job opens its own.
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigurationError as err:
        print(f"lightning-compress: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
