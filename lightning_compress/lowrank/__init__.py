"""Trainer-free low rank: rank plans, truncation and retraction, factored layers, records."""

from lightning_compress.lowrank.config import LowRankConfig
from lightning_compress.lowrank.factored import FactoredLayer, factoring_refusal
from lightning_compress.lowrank.factors import (
    Truncation,
    full_rank,
    kept_energy,
    lowrank_record,
    rank_for_energy,
    retract,
    truncate,
)
from lightning_compress.lowrank.plan import RankPlan, build_rank_plan, target_ranks
from lightning_compress.lowrank.record import LowRankLayer

__all__ = [
    "FactoredLayer",
    "LowRankConfig",
    "LowRankLayer",
    "RankPlan",
    "Truncation",
    "build_rank_plan",
    "factoring_refusal",
    "full_rank",
    "kept_energy",
    "lowrank_record",
    "rank_for_energy",
    "retract",
    "target_ranks",
    "truncate",
]
