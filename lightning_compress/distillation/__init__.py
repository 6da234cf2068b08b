"""Knowledge distillation without a Trainer: the :class:`Distiller` (losses mixed, teacher run or
memoized, adapters trained), its :class:`DistillConfig`, and the pieces it is made of.
``DistillationCallback`` drives a Distiller from the training loop."""

from lightning_compress.distillation.capture import (
    TeacherMemo,
    example_fingerprints,
    first_tensor,
    logits_of,
    make_adapter,
)
from lightning_compress.distillation.config import DistillConfig
from lightning_compress.distillation.distiller import Distiller, Forward, RunningMeans
from lightning_compress.distillation.losses import agreement, feature_loss, kd_loss
from lightning_compress.distillation.teacher import load_teacher, teacher_digest

__all__ = [
    "DistillConfig",
    "Distiller",
    "Forward",
    "RunningMeans",
    "TeacherMemo",
    "agreement",
    "example_fingerprints",
    "feature_loss",
    "first_tensor",
    "kd_loss",
    "load_teacher",
    "logits_of",
    "make_adapter",
    "teacher_digest",
]
