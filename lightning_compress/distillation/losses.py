"""Distillation losses (Hinton et al. 2015) and teacher-student agreement."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(logits: torch.Tensor, class_dim: int) -> torch.Tensor:
    """(N, C) view of logits whose classes lie along ``class_dim``, in float32."""
    return logits.movedim(class_dim, -1).reshape(-1, logits.shape[class_dim]).float()


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, class_dim: int = -1
) -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), averaged over examples (rows).

    The T^2 factor keeps the gradient's magnitude independent of T (Hinton et al. 2015, sec. 2).
    Every position along the non-class dimensions counts as one example (tokens, pixels).
    """
    s = F.log_softmax(_rows(student, class_dim) / temperature, dim=-1)
    t = F.log_softmax(_rows(teacher, class_dim) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def agreement(student: torch.Tensor, teacher: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """Fraction of examples on which student and teacher predict the same class."""
    s = _rows(student.detach(), class_dim).argmax(dim=-1)
    t = _rows(teacher, class_dim).argmax(dim=-1)
    return (s == t).float().mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between an (adapted) student feature and the teacher's, in float32."""
    return F.mse_loss(student.float(), teacher.float())
