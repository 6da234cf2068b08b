"""Callbacks that read their settings from a :class:`~lightning_compress.config.MethodConfig`."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import Callback

from lightning_compress.config import MethodConfig


class ConfiguredCallback(Callback):
    """A callback whose settings are one validated, frozen config.

    Settings are read as attributes (``callback.sparsity``), forwarded to ``self.config``; they
    cannot be reassigned on the callback, so what was validated is what runs.
    """

    config: MethodConfig

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: the config's fields, nothing else.
        config = self.__dict__.get("config")
        if config is not None and name in type(config).field_names():
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.config.state_key_fields())
