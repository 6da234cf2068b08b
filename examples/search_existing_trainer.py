"""Add SearchCallback to an existing Trainer: each layer's compression chosen against this
machine's latency (ProxylessNAS), then packed and timed.

LeNet-300-100 on the embedded MNIST subset, served at batch 256. Every candidate of every layer
(fp32, int8, int4, sparse int8 at 50-95%, sparse int4) is packed and timed at that batch in
setup; the search samples one candidate per layer per step, learns which to keep against the
budget (a fraction of the all-int8 model's predicted latency), then trains the chosen model to
the end. `pack(..., qat=search)` writes it, `load_into(batch_size=256)` rebuilds it with the
fastest implementations, and `model_latency` compares what the search predicted with what the
packed model measures.

    python examples/search_existing_trainer.py [--epochs 30] [--budget 0.8xint8] [--fast]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_compress.export import evaluate, load_into, pack
from lightning_compress.export.latency import model_latency
from lightning_compress.search import SearchCallback
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k

BATCH = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--budget", default="0.8xint8")
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    epochs = 3 if args.fast else args.epochs
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer)
    example = torch.zeros(1, 1, 28, 28)
    search = SearchCallback(
        candidates=["fp32", "int8", "int4", "s50-int8", "s75-int8", "s90-int8", "s95-int8"],
        # The all-int8 model always fits; a smaller fraction may be below the fastest
        # configuration on some machines (the error says what the minimum is).
        budget="1xint8" if args.fast else args.budget,
        batch_size=BATCH,
        start=f"{max(1, epochs // 15)}ep",
        end=f"{max(2, epochs // 3)}ep",
        example=example,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[search],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64)
    trainer.fit(model, datamodule=data)
    print(search.describe())
    print("chosen:\n" + search.summary())
    trained = evaluate(model.net, data.test_dataloader())  # as trained: the search's hooks on

    out = Path(tempfile.mkdtemp()) / "model.packed.safetensors"
    search.remove()
    if not len(search.record or ()):
        print(f"search: every layer chose fp32; test accuracy {100 * trained:.2f}%")
        return
    pack(model.net, out, qat=search, bits=None)
    packed = load_into(LeNet300100(), out, batch_size=BATCH, example=example, exact=True)
    reloaded = evaluate(packed, data.test_dataloader())
    x = torch.randn(BATCH, 1, 28, 28)
    measured = model_latency(packed, x, reps=15)
    print(measured)
    print(
        f"search: test accuracy {100 * trained:.2f}%, reloaded {100 * reloaded:.2f}%; "
        f"predicted {search.predicted_ms():.3f} ms (budget {search.budget:.3f} ms), "
        f"measured {measured.measured_ms:.3f} ms at batch {BATCH}"
    )


if __name__ == "__main__":
    main()
