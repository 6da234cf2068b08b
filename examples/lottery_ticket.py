"""A lottery ticket (Frankle & Carbin 2019) in one Lightning run, with its reinit control.

Every 10 epochs 20% of the remaining weights are pruned (the output layer 10%) and the survivors
are rewound to their initial values; `--mode reinit` re-samples them instead, `--mode lr` keeps
them and replays the LR schedule (Renda et al. 2020).

    python examples/lottery_ticket.py [--mode weights|reinit|lr] [--rounds 9] [--fast]
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch

from lightning_compress import PruneCallback, RewindCallback
from lightning_compress.zoo import ClassificationModule, LeNet300100, MNIST5k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["weights", "reinit", "lr"], default="weights")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--round-epochs", type=int, default=10)
    parser.add_argument("--fast", action="store_true", help="a few batches, to try it out")
    args = parser.parse_args()
    pl.seed_everything(0)
    per_round = 1 if args.fast else args.round_epochs
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    # One round of the cosine schedule; every rewind replays it.
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=per_round)
    model = ClassificationModule(LeNet300100(), optimizer=optimizer, scheduler=scheduler)
    prune = PruneCallback(
        schedule="iterative",
        rate=0.2,
        rates={"fc3": 0.1},
        sparsity=1 - 0.8**args.rounds,
        start=f"{per_round}ep",
        every=f"{per_round}ep",
    )
    trainer = pl.Trainer(
        max_epochs=per_round * (args.rounds + 1),
        callbacks=[prune, RewindCallback(to="0ep", mode=args.mode)],
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=10 if args.fast else None,
        limit_val_batches=2 if args.fast else None,
        limit_test_batches=2 if args.fast else None,
    )
    data = MNIST5k(batch_size=64)
    trainer.fit(model, datamodule=data)
    for r in prune.rounds:
        print(f"round {r['round']}: {100 * r['remaining']:5.1f}% left, val acc {r.get('val/acc')}")
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"{args.mode}: test accuracy {100 * result['test/acc']:.2f}%")


if __name__ == "__main__":
    main()
