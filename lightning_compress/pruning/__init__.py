"""Trainer-free pruning: step parsing, schedules, criteria, masks, hard-mask enforcement."""

from lightning_compress.pruning.criteria import (
    CRITERIA,
    CriterionContext,
    get_criterion,
    register_criterion,
)
from lightning_compress.pruning.masks import channel_masks, nm_masks, parse_nm, unstructured_masks
from lightning_compress.pruning.schedules import SCHEDULES, Schedule
from lightning_compress.pruning.steps import Step, parse_step

__all__ = [
    "CRITERIA",
    "SCHEDULES",
    "CriterionContext",
    "Schedule",
    "Step",
    "channel_masks",
    "get_criterion",
    "nm_masks",
    "parse_nm",
    "parse_step",
    "register_criterion",
    "unstructured_masks",
]
