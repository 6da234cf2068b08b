"""Knowledge distillation added to an existing Trainer: a teacher is trained, then a small
student learns from its softened outputs while being pruned and quantized.

Step 1 trains LeNet-5 (the teacher) on mnist5k as usual. Step 2 trains a 784-100-100-10 MLP
twice on the same fixed training set: alone, then with DistillationCallback (T = 4, alpha 0.9,
teacher outputs memoized), PruneCallback (90%) and QATCallback (int8) on the same Trainer. The
LightningModule is the same class in every run: the callbacks change nothing in it.

    python examples/distill_existing_trainer.py [--epochs 30] [--fast]
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch

from lightning_compress import DistillationCallback, PruneCallback, QATCallback
from lightning_compress.zoo import ClassificationModule, LeNet5, LeNet300100, MNIST5k


def train(net, epochs, callbacks, fast, lr=0.05, shift=0):
    optimizer = functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    model = ClassificationModule(net, optimizer=optimizer, scheduler=scheduler)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=10 if fast else None,
        limit_val_batches=2 if fast else None,
        limit_test_batches=4 if fast else None,
    )
    data = MNIST5k(batch_size=64, shift=shift)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    return 100 * result["test/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    epochs = 2 if args.fast else args.epochs
    pl.seed_everything(0)
    teacher = LeNet5()
    teacher_acc = train(teacher, 2 if args.fast else 20, [], args.fast, shift=2)
    print(f"teacher LeNet-5: test accuracy {teacher_acc:.2f}%")

    pl.seed_everything(0)
    alone = train(LeNet300100(hidden=(100, 100)), epochs, [], args.fast)
    print(f"student alone: test accuracy {alone:.2f}%")

    pl.seed_everything(0)
    distill = DistillationCallback(teacher, temperature=4.0, alpha=0.9, precompute=True)
    prune = PruneCallback(sparsity=0.9, start=f"{epochs // 6}ep", end=f"{epochs // 2}ep")
    callbacks = [distill, prune, QATCallback(bits=8)]
    compressed = train(LeNet300100(hidden=(100, 100)), epochs, callbacks, args.fast, lr=0.01)
    print(f"student distilled + pruned 90% + int8: test accuracy {compressed:.2f}%")


if __name__ == "__main__":
    main()
