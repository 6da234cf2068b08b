"""Add PruneCallback to an existing Trainer: LeNet-300-100 pruned to 90% while it trains.

python examples/prune_existing_trainer.py [--epochs 30] [--fast]
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch

from lightning_compress import PruneCallback
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer)
    epochs = 3 if args.fast else args.epochs
    prune = PruneCallback(
        sparsity=0.9, schedule="cubic", start=f"{epochs // 6}ep", end=f"{epochs // 2}ep", every=20
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[prune],
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
        limit_test_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    zeros = sum(r["numel"] - r["nonzero"] for r in prune.layer_stats())
    total = sum(r["numel"] for r in prune.layer_stats())
    print(
        f"test accuracy {100 * result['test/acc']:.2f}%, {100 * zeros / total:.1f}% of weights zero"
    )


if __name__ == "__main__":
    main()
