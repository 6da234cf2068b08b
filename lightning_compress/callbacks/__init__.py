"""One Lightning callback per file; each hook is thin and calls a Trainer-free module."""

from lightning_compress.callbacks.prune import PruneCallback

__all__ = ["PruneCallback"]
