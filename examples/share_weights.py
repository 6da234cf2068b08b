"""Deep Compression in an existing training loop: pruning, k-means weight sharing, entropy coding.

LeNet-300-100 is pruned gradually (keep 3.5% of fc1, 5% of fc2, 20% of fc3); near the end each
layer's surviving weights are clustered into 2^bits centroids (``QATCallback(scheme="kmeans")``),
the centroids train on the summed gradients of their weights, and ``pack`` stores each layer as
its codebook, Huffman-coded indices and Rice-coded positions. The reloaded model computes with
the codebook's exact values.

    python examples/share_weights.py [--epochs 30] [--bits 4] [--fast]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.export import evaluate, load_into, pack, report
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    epochs = 4 if args.fast else args.epochs
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer, scheduler=scheduler)
    prune = PruneCallback(
        sparsity=0.965,
        overrides={"fc2": 0.95, "fc3": 0.8},
        scope="layer",
        schedule="cubic",
        start=f"{epochs // 6}ep",
        end=f"{epochs // 2}ep",
        every=20,
    )
    # Shared from 80% of training: the pruned network has recovered by then.
    share = QATCallback(
        bits=args.bits, scheme="kmeans", activations=None, start=f"{epochs * 4 // 5}ep"
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[prune, share],
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64)
    trainer.fit(model, datamodule=data)
    data.setup("test")
    trained = evaluate(model.net, data.test_dataloader())
    with tempfile.TemporaryDirectory() as tmp:
        path = pack(model.net, Path(tmp) / "lenet300.shared.safetensors", qat=share)
        print(report(path))
        share.remove(model)
        packed = load_into(LeNet300100(), path)
        reloaded = evaluate(packed, data.test_dataloader())
    print(f"k-means {args.bits}-bit: trained {100 * trained:.2f}%, reloaded {100 * reloaded:.2f}%")


if __name__ == "__main__":
    main()
