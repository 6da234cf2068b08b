"""Run by test_prune_ddp.py: 2-process DDP on the CPU (gloo); each rank writes its state digests."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from lightning_compress import DistillationCallback, PruneCallback, QATCallback, RewindCallback
from lightning_compress.distillation import teacher_digest
from lightning_compress.pruning import register_criterion
from tests.helpers import TinyMLP, digest, make_trainer


@register_criterion("rank_dependent")
def rank_dependent(weight: torch.Tensor, ctx) -> torch.Tensor:
    """Scores that differ on every rank: only rank 0's broadcast can make the masks agree."""
    rank = torch.distributed.get_rank()
    generator = torch.Generator().manual_seed(1000 * rank + ctx.step)
    return torch.rand(weight.shape, generator=generator)


def main(out_dir: Path, criterion: str) -> None:
    pl.seed_everything(0)
    qat = distill = None
    if criterion == "distill":
        # Distillation with a feature adapter (trained by the callback's own optimizer) and pruning.
        torch.manual_seed(11)
        teacher = torch.nn.Sequential(
            torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4)
        )
        pl.seed_everything(0)
        prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep")
        distill = DistillationCallback(teacher, temperature=2.0, features=[("fc1", "0", 0.5)])
        callbacks = [prune, distill]
        teacher_before = teacher_digest(teacher)
    elif criterion == "qat":
        # Pruning and QAT together: observers see each rank's own batches and must still agree.
        prune = PruneCallback(sparsity=0.5, schedule="oneshot", start="1ep")
        qat = QATCallback(bits=4, activations=8)
        callbacks = [qat, prune]
    elif criterion == "flipout":
        # Iterative FlipOut with learning-rate rewinding: flips, noise and rewinds on every rank.
        prune = PruneCallback(
            sparsity=0.75,
            schedule="iterative",
            rate=0.5,
            start="1ep",
            every="1ep",
            criterion=criterion,
        )
        callbacks = [prune, RewindCallback(to="2it", mode="lr")]
    else:
        prune = PruneCallback(
            sparsity=0.8, schedule="cubic", start=0, end="2ep", every="2it", criterion=criterion
        )
        callbacks = [prune]
    trainer = make_trainer(
        out_dir, callbacks, max_epochs=3, strategy="ddp", devices=2, accelerator="cpu"
    )
    model = TinyMLP()
    trainer.fit(model)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "masks": digest(prune.masks.keep_masks()),
        "weights": digest(dict(model.named_parameters())),
        "flips": digest(prune.flips.flips) if prune.flips is not None else None,
        "flip_total": int(sum(f.sum() for f in prune.flips.flips.values())) if prune.flips else 0,
        "events": [e["step"] for e in prune.events],
        "sparsity": prune.events[-1]["sparsity"],
        "global_step": trainer.global_step,
        "observers": digest(
            {
                f"{n}.{k}": torch.as_tensor(o.state_dict()[k])
                for n, o in qat.layers.observers.items()
                for k in ("min", "max")
            }
        )
        if qat
        else None,
        "adapters": digest(distill.adapters.state_dict()) if distill else None,
        "teacher_unchanged": teacher_digest(distill.teacher) == teacher_before if distill else None,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
