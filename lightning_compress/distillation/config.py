"""The settings of knowledge distillation, validated once, Trainer-free."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from lightning_compress.config import MethodConfig

FeaturePair = tuple[str, str, float]


def _parse_features(features: Any) -> tuple[FeaturePair, ...]:
    """``(student_layer, teacher_layer, weight)`` triples from pairs, triples or mappings."""
    if features is None:
        return ()
    if isinstance(features, (str, Mapping)) or not isinstance(features, Sequence):
        raise ValueError(
            "`features` must be a list of (student_layer, teacher_layer[, weight]) pairs or of "
            f"{{student, teacher, weight}} mappings, got {features!r}"
        )
    pairs = []
    for item in features:
        if isinstance(item, Mapping):
            unknown = set(item) - {"student", "teacher", "weight"}
            if unknown or "student" not in item or "teacher" not in item:
                raise ValueError(
                    "a `features` mapping needs 'student' and 'teacher' (and optionally "
                    f"'weight'), got {dict(item)!r}"
                )
            student, teacher, weight = item["student"], item["teacher"], item.get("weight", 1.0)
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
            student, teacher, weight = (*item, 1.0)[:3]
        else:
            raise ValueError(
                f"each `features` entry must be (student_layer, teacher_layer[, weight]), got "
                f"{item!r}"
            )
        if not isinstance(student, str) or not isinstance(teacher, str):
            raise ValueError(f"`features` layer names must be strings, got {item!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"`features` weight must be a number >= 0, got {weight!r}")
        pairs.append((student, teacher, float(weight)))
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class DistillConfig(MethodConfig):
    """Teacher-student training (Hinton et al. 2015), the arguments of ``DistillationCallback``.

    Args:
        teacher: An ``nn.Module``; a Hydra config (mapping with ``_target_``); or the path of a
            checkpoint of ``teacher_class``.
        temperature: Softmax temperature T > 0.
        alpha: Weight of the distillation term, in [0, 1].
        features: Pairs ``(student_layer, teacher_layer[, weight])`` (or mappings with those
            keys) matched with mean squared error; stored as ``(student, teacher, weight)``
            triples.
        teacher_checkpoint: Weights for the teacher: ``.safetensors`` or a Lightning/torch
            checkpoint, read with ``weights_only=True``.
        teacher_class: With a checkpoint path as ``teacher``: its class (or dotted import path).
        student: Dotted name of the submodule whose forward produces the logits (None: the
            module given to the distiller itself).
        class_dim: Dimension of the logits holding the classes.
        precompute: Memoize teacher outputs per training example.
        adapter_lr: Learning rate of the feature adapters' Adam.

    Raises:
        ValueError: An argument out of range, with the allowed values.
    """

    VERSION: ClassVar[int] = 1
    STATE_KEY: ClassVar[tuple[str, ...]] = ("temperature", "alpha", "student")

    # A module or a mapping: compared (and hashed) by nothing, like any object held by reference.
    teacher: Any = dataclasses.field(compare=False)
    temperature: float = 4.0
    alpha: float = 0.9  # 1 - alpha of the loss stays on the module's own (hard-label) loss
    features: Any = None
    teacher_checkpoint: str | Path | None = None
    teacher_class: type | str | None = None
    student: str | None = None
    class_dim: int = -1  # logits of dense predictions (N, C, H, W) have their classes in dim 1
    precompute: bool = False
    adapter_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.teacher is None:
            raise ValueError("`teacher` is required: an nn.Module, a config or a checkpoint path")
        for arg in ("temperature", "alpha"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{arg}` must be a number, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.class_dim, int) or isinstance(self.class_dim, bool):
            raise ValueError(f"`class_dim` must be an integer, got {self.class_dim!r}")
        if not (isinstance(self.adapter_lr, (int, float)) and self.adapter_lr > 0):
            raise ValueError(f"`adapter_lr` must be > 0, got {self.adapter_lr!r}")
        if self.student is not None and not isinstance(self.student, str):
            raise ValueError(f"`student` must be a submodule name or None, got {self.student!r}")
        # Floats, so that the state key reads the same for 4 and 4.0 (old checkpoints load).
        self._normalize("temperature", float(self.temperature))
        self._normalize("alpha", float(self.alpha))
        self._normalize("features", _parse_features(self.features))
        self._normalize("precompute", bool(self.precompute))
        self._normalize("adapter_lr", float(self.adapter_lr))
