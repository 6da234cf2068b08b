"""The pattern every method's configuration follows, on the Trainer-free floor.

Each method (pruning, QAT, distillation, and the ones to come) describes its arguments as one
frozen dataclass that validates itself once, in ``__post_init__``, with messages that name the
argument, the value given and what is allowed. The callback of that method takes the same keyword
arguments (a test keeps the two signatures equal), builds its config from them and reads every
setting from it, so YAML configs, users and Trainer-free code see one set of rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of the per-method configs.

    Class attributes:
        VERSION: Bumped when a field's meaning changes; stored in the callback's checkpoint state.
        STATE_KEY: The fields that tell two instances of the callback apart in a checkpoint
            (Lightning's ``state_key``), in the order the key is built.
    """

    VERSION: ClassVar[int] = 1
    STATE_KEY: ClassVar[tuple[str, ...]] = ()

    def _normalize(self, name: str, value: Any) -> None:
        """Replaces a field's value after validation (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    def state_key_fields(self) -> dict[str, Any]:
        """The values that form the callback's ``state_key``."""
        return {name: getattr(self, name) for name in self.STATE_KEY}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MethodConfig:
        """Builds a config from a mapping, naming unknown keys and the allowed ones."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {unknown}; allowed: {list(cls.field_names())}"
            )
        return cls(**values)
