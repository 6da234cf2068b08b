"""lightning-compress: model compression as PyTorch Lightning callbacks."""

__version__ = "0.1.0.dev0"
