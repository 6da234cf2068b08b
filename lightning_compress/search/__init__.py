"""Hardware-aware search (ProxylessNAS): per-layer compression and architecture choices learned
during training against latencies measured on this machine."""

from lightning_compress.search.callback import SearchCallback
from lightning_compress.search.candidates import Candidate
from lightning_compress.search.choice import Choice

__all__ = ["Candidate", "Choice", "SearchCallback"]
