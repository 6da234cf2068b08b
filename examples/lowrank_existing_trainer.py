"""Add LowRankCallback to an existing Trainer: LeNet-300-100 with fc1 and fc2 at low rank.

fc1 (784x300) is held at rank 36 and fc2 (300x100) at rank 12, a sixth of their parameters
each (a rank-r weight m x n costs r (m + n)), reached by a cubic ramp and fine-tuned; fc3, the
output layer, stays dense. The LightningModule does not change; after fit its layers are the
plain ones, computing the rank-r weights. `pack(..., lowrank=...)` then stores each factored
layer as its two factors (int8 here), and `load_into` rebuilds a fresh LeNet-300-100 that
computes through them.

    python examples/lowrank_existing_trainer.py [--epochs 30] [--method projected|factored] [--fast]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_compress import LowRankCallback
from lightning_compress.export import evaluate, load_into, pack
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--method", choices=["projected", "factored"], default="projected")
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    epochs = 3 if args.fast else args.epochs
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer, scheduler=scheduler)
    lowrank = LowRankCallback(
        rank=36,
        overrides={"fc2": 12},
        schedule="cubic",
        start=f"{epochs // 10}ep",  # 3 to 12 of 30 epochs, as recipe=lowrank_lenet300
        end=f"{2 * epochs // 5}ep",
        include=["fc1", "fc2"],
        method=args.method,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[lowrank],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64, shift=2)  # +-2 px shifts, as the recipes train
    trainer.fit(model, datamodule=data)
    trained = evaluate(model.net, data.test_dataloader())
    for row in lowrank.layer_stats():
        print(
            f"{row['layer']}: rank {row['rank']} of {row['full_rank']}, "
            f"{row['params']:,} of {row['dense']:,} parameters"
        )
    params = sum(r["params"] for r in lowrank.layer_stats())
    dense = sum(r["dense"] for r in lowrank.layer_stats())
    print(
        f"{args.method}: test accuracy {100 * trained:.2f}%, "
        f"fc1+fc2 {dense / params:.1f}x fewer parameters"
    )

    out = Path(tempfile.mkdtemp()) / "model.packed.safetensors"
    # model.net: the record's names carry the module's "net." prefix; int8 factors, like the
    # post-training int8 of fc3 (bits=8).
    pack(model.net, out, lowrank=lowrank.to_record(bits=8), bits=8)
    packed = load_into(LeNet300100(), out)
    reloaded = evaluate(packed, data.test_dataloader())
    print(f"packed: {out.stat().st_size:,} bytes, test accuracy {100 * reloaded:.2f}%")


if __name__ == "__main__":
    main()
