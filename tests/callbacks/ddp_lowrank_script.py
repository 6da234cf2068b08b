"""Run by test_lowrank_ddp.py: 2-process DDP on the CPU (gloo); each rank writes its digests."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from lightning_compress import LowRankCallback
from tests.helpers import TinyMLP, digest, make_trainer


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    lowrank = LowRankCallback(
        rank=0.25, schedule="cubic", start=0, end="2ep", every="2it", exclude="fc3"
    )
    trainer = make_trainer(
        out_dir, [lowrank], max_epochs=3, strategy="ddp", devices=2, accelerator="cpu"
    )
    model = TinyMLP()
    trainer.fit(model)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "weights": digest(dict(model.named_parameters())),
        "bases": digest(lowrank.bases),
        "ranks": lowrank.ranks,
        "events": [e["step"] for e in lowrank.events],
        "global_step": trainer.global_step,
        "max_rank": {
            n: int((torch.linalg.svdvals(model.get_parameter(n).detach()) > 1e-4).sum())
            for n in lowrank.targets
        },
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
