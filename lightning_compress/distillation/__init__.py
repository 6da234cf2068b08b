"""Knowledge distillation without a Trainer: losses, output and feature capture, teacher loading,
adapters and the teacher-output memo. ``DistillationCallback`` wires them into the training
loop."""

from lightning_compress.distillation.capture import (
    TeacherMemo,
    example_fingerprints,
    logits_of,
    make_adapter,
)
from lightning_compress.distillation.losses import agreement, feature_loss, kd_loss
from lightning_compress.distillation.teacher import load_teacher, teacher_digest

__all__ = [
    "TeacherMemo",
    "agreement",
    "example_fingerprints",
    "feature_loss",
    "kd_loss",
    "load_teacher",
    "logits_of",
    "make_adapter",
    "teacher_digest",
]
