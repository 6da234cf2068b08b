"""Positions of non-zero weights, Rice-coded close to their information content.

The non-zeros of a weight are taken in row-major order; each is coded by its gap g >= 0 (the
zeros skipped since the previous one). A Rice code with parameter k writes ``g >> k`` in unary
(that many 1 bits, then a 0) and the low ``k`` bits of ``g`` verbatim. For gaps of a random
pattern at density d (geometric), the best k costs within a few percent of the entropy
H(d) / d bits per non-zero: about 5.0 bits at 90% sparsity (entropy 4.7) against 16 for int16
column indices. The two parts are kept in separate bit streams so both decode with vector ops.
"""

from __future__ import annotations

import torch

from lightning_compress.ops import pack_bits, unpack_bits

MAX_K = 30


def best_k(gaps: torch.Tensor) -> int:
    """The Rice parameter with the fewest total bits for ``gaps`` (int64)."""
    if gaps.numel() == 0:
        return 0
    costs = [int((gaps >> k).sum()) + gaps.numel() * (k + 1) for k in range(MAX_K + 1)]
    return min(range(MAX_K + 1), key=costs.__getitem__)


def encode(flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Codes strictly increasing flat indices (int64).

    Returns:
        ``(unary, low, k, unary_bits)``: the two packed bit streams (uint8), the Rice parameter
        and the unary stream's length in bits.
    """
    n = flat_index.numel()
    previous = torch.cat([flat_index.new_full((1,), -1), flat_index[:-1]]) if n else flat_index
    gaps = flat_index - previous - 1
    k = best_k(gaps)
    high = gaps >> k
    unary_bits = int(high.sum()) + n
    unary = torch.ones(unary_bits, dtype=torch.bool)
    unary[torch.cumsum(high + 1, 0) - 1] = False  # each gap's terminating 0
    low = ((gaps.unsqueeze(1) >> torch.arange(k)) & 1).bool().reshape(-1)
    return pack_bits(unary), pack_bits(low), k, unary_bits


def decode(
    unary: torch.Tensor, low: torch.Tensor, k: int, unary_bits: int, count: int, numel: int
) -> torch.Tensor:
    """Inverse of :func:`encode`: ``count`` flat indices, all checked to lie below ``numel``.

    Raises:
        ValueError: The streams do not hold ``count`` gaps or the indices overflow ``numel``.
    """
    if not 0 <= k <= MAX_K or count < 0 or unary_bits < count:
        raise ValueError(f"bad position code (k={k}, count={count}, bits={unary_bits})")
    if unary.dtype != torch.uint8 or low.dtype != torch.uint8:
        raise ValueError("position streams must be uint8")
    if unary.numel() != (unary_bits + 7) // 8 or low.numel() != (k * count + 7) // 8:
        raise ValueError("position streams have the wrong length")
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    bits = unpack_bits(unary, unary_bits)
    ends = (~bits).nonzero().reshape(-1)
    if ends.numel() != count or int(ends[-1]) != unary_bits - 1:
        raise ValueError(f"position code holds {ends.numel()} gaps, expected {count}")
    previous = torch.cat([ends.new_full((1,), -1), ends[:-1]])
    high = ends - previous - 1
    low_bits = unpack_bits(low, k * count).view(count, k).to(torch.int64)
    gaps = (high << k) | (low_bits << torch.arange(k)).sum(dim=1)
    flat = torch.cumsum(gaps + 1, 0) - 1
    if int(flat[-1]) >= numel:
        raise ValueError(f"positions run past the weight's {numel} entries")
    return flat
