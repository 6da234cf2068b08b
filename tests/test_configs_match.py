"""Each callback takes exactly its config's fields as keyword arguments, with the same defaults."""

import dataclasses
import inspect

import pytest

from lightning_compress import DistillationCallback, LowRankCallback, PruneCallback, QATCallback
from lightning_compress.distillation import DistillConfig
from lightning_compress.lowrank import LowRankConfig
from lightning_compress.pruning import PruneConfig
from lightning_compress.quantization import QATConfig

PAIRS = [
    (DistillationCallback, DistillConfig),
    (LowRankCallback, LowRankConfig),
    (PruneCallback, PruneConfig),
    (QATCallback, QATConfig),
]


def _fields(config: type) -> list[tuple[str, object]]:
    def default(f: dataclasses.Field) -> object:
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return inspect.Parameter.empty

    return [(f.name, default(f)) for f in dataclasses.fields(config)]


@pytest.mark.parametrize(("callback", "config"), PAIRS, ids=lambda c: c.__name__)
def test_callback_signature_equals_config_fields(callback, config):
    params = list(inspect.signature(callback.__init__).parameters.values())[1:]  # no self
    assert [(p.name, p.default) for p in params] == _fields(config)
