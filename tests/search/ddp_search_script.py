"""Run by test_search.py: 2-process DDP on the CPU (gloo); each rank writes what it searched."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_compress.export.latency import LatencyTable
from lightning_compress.search import SearchCallback
from tests.helpers import TinyMLP, digest, make_trainer


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    search = SearchCallback(
        candidates=["fp32", "int8", "s50-int8", "s75-int4"],
        budget=1e3,
        start="1ep",
        end="3ep",
        latency=LatencyTable(None, reps=1),
    )
    trainer = make_trainer(
        out_dir, [search], max_epochs=4, strategy="ddp", devices=2, accelerator="cpu"
    )
    model = TinyMLP()
    trainer.fit(model)
    record = {
        "world_size": trainer.world_size,
        "alpha": digest(search.alpha),
        "latency": digest(search.latency),
        "chosen": search.chosen(),
        "weights": digest(dict(model.named_parameters())),
        "paths": search.sampled,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
