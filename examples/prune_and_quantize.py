"""Pruning and int8 quantization-aware training together, then the true integer weights.

LeNet-300-100 loses 90% of its weights to gradual magnitude pruning while QATCallback trains it
with int8 weights and activations; at the end `qat.record` holds int8 tensors and scales.

    python examples/prune_and_quantize.py [--epochs 30] [--bits 8] [--fast]
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    epochs = 3 if args.fast else args.epochs
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer, scheduler=scheduler)
    prune = PruneCallback(sparsity=0.9, start=f"{epochs // 6}ep", end=f"{epochs // 2}ep", every=20)
    qat = QATCallback(bits=args.bits, activations=8)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[prune, qat],
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
        limit_test_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    for name, layer in qat.record.items():
        nonzero = int(torch.count_nonzero(layer.values))
        print(f"{name}: {tuple(layer.values.shape)} int{layer.bits}, non-zero integers {nonzero}")
    print(f"pruned + int{args.bits}: test accuracy {100 * result['test/acc']:.2f}%")


if __name__ == "__main__":
    main()
