"""Run by test_prune_ddp.py: 2-process DDP on the CPU (gloo); each rank writes its mask digest."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_compress import PruneCallback
from tests.helpers import TinyMLP, digest, make_trainer


def main(out_dir: Path, criterion: str) -> None:
    pl.seed_everything(0)
    prune = PruneCallback(
        sparsity=0.8, schedule="cubic", start=0, end="2ep", every="2it", criterion=criterion
    )
    trainer = make_trainer(
        out_dir, [prune], max_epochs=3, strategy="ddp", devices=2, accelerator="cpu"
    )
    model = TinyMLP()
    trainer.fit(model)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "masks": digest(prune.masks.keep_masks()),
        "weights": digest(dict(model.named_parameters())),
        "events": [e["step"] for e in prune._history],
        "sparsity": prune._history[-1]["prune/sparsity"],
        "global_step": trainer.global_step,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
