"""lightning-compress: model compression as PyTorch Lightning callbacks."""

from lightning_compress.callbacks import (
    DistillationCallback,
    LowRankCallback,
    PruneCallback,
    QATCallback,
    RewindCallback,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DistillationCallback",
    "LowRankCallback",
    "PruneCallback",
    "QATCallback",
    "RewindCallback",
]
