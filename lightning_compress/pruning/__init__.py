"""Trainer-free pruning: step parsing, schedules, criteria, masks, hard-mask enforcement."""

from lightning_compress.pruning.criteria import (
    CRITERIA,
    Criterion,
    CriterionContext,
    get_criterion,
    register_criterion,
)
from lightning_compress.pruning.flipout import FlipCounter, flipout
from lightning_compress.pruning.masks import (
    channel_masks,
    count_zeros,
    nm_masks,
    parse_nm,
    sparsity,
    unstructured_masks,
)
from lightning_compress.pruning.schedules import SCHEDULES, Schedule
from lightning_compress.clock import Step, parse_step

__all__ = [
    "CRITERIA",
    "SCHEDULES",
    "Criterion",
    "CriterionContext",
    "FlipCounter",
    "Schedule",
    "Step",
    "channel_masks",
    "count_zeros",
    "flipout",
    "get_criterion",
    "nm_masks",
    "parse_nm",
    "parse_step",
    "register_criterion",
    "sparsity",
    "unstructured_masks",
]
