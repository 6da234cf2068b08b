"""Run by test_qat_kmeans.py: 2-process DDP on the CPU (gloo); each rank writes its digests."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_compress import PruneCallback, QATCallback
from tests.helpers import TinyMLP, digest, make_trainer


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep")
    qat = QATCallback(bits=2, scheme="kmeans", refresh="2it", kmeans_lr=1e-2)
    trainer = make_trainer(
        out_dir, [prune, qat], max_epochs=3, strategy="ddp", devices=2, accelerator="cpu"
    )
    model = TinyMLP()
    initial = {}  # the codebooks as clustered (and broadcast), before any centroid step
    original = qat._init_codebooks

    def keep_initial(shared):
        initial.update({n: s.codebook.detach().clone() for n, s in shared.items()})
        original(shared)

    qat._init_codebooks = keep_initial
    trainer.fit(model)
    shared = qat.layers.shared
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "codebooks": digest({n: s.codebook for n, s in shared.items()}),
        "initial_codebooks": digest(initial),
        "indices": digest({n: s.indices for n, s in shared.items()}),
        "weights": digest(dict(model.named_parameters())),
        "refreshes": qat._last_refresh,  # the step of the last refresh
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
