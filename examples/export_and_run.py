"""Train with pruning and int8 QAT, pack the network, reload it and run it with the kernels.

LeNet-300-100 on the embedded MNIST subset: 90% of the weights pruned, int8 weights and
activations trained. `pack` writes the compact artifact; `load_into` rebuilds a fresh
LeNet-300-100 around it (sparse int8 kernels); the reloaded network is evaluated on the test split
next to the fake-quantized one, and timed against the fp32 network.

    python examples/export_and_run.py [--epochs 30] [--out model.packed.safetensors] [--fast]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.export import evaluate, latency, load_into, pack, report
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    epochs = 3 if args.fast else args.epochs
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer)
    prune = PruneCallback(sparsity=0.9, start=f"{epochs // 6}ep", end=f"{epochs // 2}ep", every=20)
    qat = QATCallback(bits=8, activations=8)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[prune, qat],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64)
    trainer.fit(model, datamodule=data)

    out = args.out or Path(tempfile.mkdtemp()) / "model.packed.safetensors"
    pack(model.net, out, qat=qat)  # model.net: the QAT names carry the module's "net." prefix
    print(report(out))
    packed = load_into(LeNet300100(), out).eval()

    loader = data.test_dataloader()
    qat.layers.install()  # the fake-quantized model, as trained, for comparison
    trained = evaluate(model.net, loader)
    qat.layers.remove()
    reloaded = evaluate(packed, loader)
    print(f"test accuracy: fake-quantized {100 * trained:.2f}%, packed {100 * reloaded:.2f}%")
    example = next(iter(loader))[0]
    times = latency({"fp32": model.net.eval(), "packed": packed}, example, [1, 256], reps=5)
    for batch in (1, 256):
        fp32_ms, packed_ms = times["fp32"][batch], times["packed"][batch]
        print(f"batch {batch}: fp32 {fp32_ms:.3f} ms, packed {packed_ms:.3f} ms")


if __name__ == "__main__":
    main()
