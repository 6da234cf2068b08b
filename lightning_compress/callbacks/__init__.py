"""One Lightning callback per file; each hook is thin and calls a Trainer-free module."""

from lightning_compress.callbacks.distill import DistillationCallback
from lightning_compress.callbacks.lowrank import LowRankCallback
from lightning_compress.callbacks.prune import PruneCallback
from lightning_compress.callbacks.qat import QATCallback
from lightning_compress.callbacks.rewind import RewindCallback

__all__ = [
    "DistillationCallback",
    "LowRankCallback",
    "PruneCallback",
    "QATCallback",
    "RewindCallback",
]
