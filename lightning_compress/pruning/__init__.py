"""Trainer-free pruning: config, schedules, criteria, masks, plans, hard-mask enforcement."""

from lightning_compress.clock import Step, parse_step
from lightning_compress.pruning.config import SCOPES, PruneConfig
from lightning_compress.pruning.criteria import (
    CRITERIA,
    Criterion,
    CriterionContext,
    get_criterion,
    register_criterion,
)
from lightning_compress.pruning.events import PruneEventSource, PruneListener
from lightning_compress.pruning.flipout import FlipCounter, flipout
from lightning_compress.pruning.masks import (
    channel_masks,
    count_zeros,
    floor_count,
    nm_masks,
    parse_nm,
    sparsity,
    unstructured_masks,
)
from lightning_compress.pruning.plan import PrunePlan, build_plan
from lightning_compress.pruning.schedules import SCHEDULES, Schedule

__all__ = [
    "CRITERIA",
    "SCHEDULES",
    "SCOPES",
    "Criterion",
    "CriterionContext",
    "FlipCounter",
    "PruneConfig",
    "PruneEventSource",
    "PruneListener",
    "PrunePlan",
    "Schedule",
    "Step",
    "build_plan",
    "channel_masks",
    "count_zeros",
    "flipout",
    "floor_count",
    "get_criterion",
    "nm_masks",
    "parse_nm",
    "parse_step",
    "register_criterion",
    "sparsity",
    "unstructured_masks",
]
