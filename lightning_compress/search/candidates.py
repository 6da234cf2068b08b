"""The compressions a search can give one layer, and what each makes of its weight.

A candidate is written as a name: ``"fp32"`` (the layer as it is), ``"int8"`` / ``"int4"``
(per-output-channel symmetric weights, as ``QATCallback`` trains them), or ``"s90-int8"``
(magnitude-pruned to 90% sparsity within the layer, then quantized). Trainer-free: the search
callback and the greedy baseline both call :meth:`Candidate.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_compress.quantization.fake import fake_quant_weight

_NAME = re.compile(r"^(?:s(?P<sparsity>[0-9]{1,2})-)?(?P<format>fp32|int8|int4)$")
BITS = {"fp32": None, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Candidate:
    """One way to compress a layer: ``sparsity`` of its weights pruned (by magnitude, within
    the layer), the rest quantized to ``bits`` (None: fp32)."""

    name: str
    sparsity: float
    bits: int | None

    @classmethod
    def parse(cls, name: str) -> Candidate:
        """The candidate ``name`` describes.

        Raises:
            ValueError: A name outside the grammar (the message gives it).
        """
        match = _NAME.match(str(name))
        if match is None:
            raise ValueError(
                f"unknown candidate {name!r}: write 'fp32', 'int8', 'int4', or a sparsity in "
                "percent before a bit width, e.g. 's90-int8' (sparse candidates are quantized)"
            )
        if match["sparsity"] is not None and match["format"] == "fp32":
            raise ValueError(
                f"candidate {name!r}: a sparse candidate is quantized ('s90-int8'); sparse fp32 "
                "has no packed form faster than its dense layer"
            )
        sparsity = int(match["sparsity"]) / 100 if match["sparsity"] else 0.0
        return cls(str(name), sparsity, BITS[match["format"]])

    @property
    def compressed(self) -> bool:
        return self.bits is not None or self.sparsity > 0

    def keep(self, numel: int) -> int:
        """How many of ``numel`` weights the candidate keeps."""
        return max(1, round((1.0 - self.sparsity) * numel))

    def mask(self, weight: torch.Tensor, threshold: float | None = None) -> torch.Tensor | None:
        """The kept weights (the largest magnitudes of ``weight``); None for a dense candidate.
        ``threshold``: keep ``|w| >= threshold`` instead (from :func:`thresholds`)."""
        if self.sparsity == 0:
            return None
        if threshold is not None:
            return weight.detach().abs() >= threshold
        flat = weight.detach().abs().reshape(-1)
        keep = self.keep(flat.numel())
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
        mask[flat.topk(keep, sorted=False).indices] = True
        return mask.view_as(weight)

    def weight(
        self,
        canonical: torch.Tensor,
        mask: torch.Tensor | None = None,
        threshold: float | None = None,
    ) -> torch.Tensor:
        """What the layer computes with, from its weight in (out, in, *kernel) order: masked,
        then fake-quantized per output channel. The gradient passes straight through to the
        kept weights (the pruned ones get none). ``mask`` overrides :meth:`mask`."""
        mask = self.mask(canonical, threshold) if mask is None else mask
        weight = canonical if mask is None else canonical * mask
        return weight if self.bits is None else fake_quant_weight(weight, self.bits)


def thresholds(weight: torch.Tensor, candidates: Sequence[Candidate]) -> list[float | None]:
    """Each candidate's magnitude threshold on ``weight`` from one sort (None where dense): the
    ``keep``-th largest magnitude (ties at it keep a few more weights, never fewer)."""
    if not any(c.sparsity > 0 for c in candidates):
        return [None] * len(candidates)
    ranked = weight.detach().abs().reshape(-1).sort(descending=True).values
    return [
        float(ranked[c.keep(ranked.numel()) - 1]) if c.sparsity > 0 else None for c in candidates
    ]


def parse_candidates(names: Sequence[str], where: str) -> list[Candidate]:
    """Parsed candidates, at least two and no repeats.

    Raises:
        ValueError: Fewer than two, a repeat, or an unknown name (``where`` says whose).
    """
    if isinstance(names, str) or len(list(names)) < 2:
        raise ValueError(
            f"{where}: give at least two candidates (a list of names such as "
            f"['fp32', 'int8', 's90-int8']), got {names!r}"
        )
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a candidate is listed twice in {list(names)}")
    try:
        return [Candidate.parse(n) for n in names]
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
