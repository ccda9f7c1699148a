"""Exact k-th smallest value among many entries, without sorting them all (TIES' trim threshold).

A small sample brackets the answer in [lo, hi]; one pass counts the entries below lo and keeps those in
[lo, hi]; the k-th smallest is then found among the few kept. If the sample was unlucky (the rank falls
outside the bracket) the caller falls back to a full `kthvalue`: the result is always exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from clmerge.merging.kernels import EAGER_CHUNK

DIRECT = 1 << 16  # below this many entries, kthvalue directly
SAMPLE = 1 << 16  # sample size of the bracket


@dataclass
class Bracket:
    """The bracket [lo, hi] (None = unbounded) and what one pass over the entries found."""

    lo: Optional[float]
    hi: Optional[float]
    below: int = 0
    candidates: list[torch.Tensor] = field(default_factory=list)

    def scan(self, values: torch.Tensor, magnitudes: bool = False) -> None:
        """Count the entries of `values` (of |values| if `magnitudes`) below lo and keep those in [lo, hi]."""
        flat = values.reshape(-1)
        for start in range(0, flat.numel(), EAGER_CHUNK):  # slices in L2: masks fused by inductor ran slower
            piece = flat[start:start + EAGER_CHUNK]
            piece = piece.abs() if magnitudes else piece
            keep = piece >= self.lo if self.lo is not None else torch.ones_like(piece, dtype=torch.bool)
            self.below += piece.numel() - int(keep.sum())
            if self.hi is not None:
                keep &= piece <= self.hi
            self.candidates.append(piece[keep])

    def pick(self, rank: int) -> Optional[float]:
        """The rank-th smallest (1-based) of everything scanned, or None if it lies outside the bracket."""
        inner = rank - self.below
        kept = torch.cat(self.candidates)
        if not 1 <= inner <= kept.numel():
            return None
        if self.lo is None and self.hi is None:  # nothing was cut away: no recursion
            return float(kept.kthvalue(inner).values)
        return kth_smallest(kept, inner)


def bracket(sample: torch.Tensor, rank: int, total: int) -> Bracket:
    """A bracket for the rank-th smallest of `total` entries, from a sample of them (about 6 sigma each side)."""
    ordered = sample.reshape(-1).sort().values
    n = ordered.numel()
    centre = rank / total * n
    margin = 6.0 * math.sqrt(n) + 8.0
    low, high = math.floor(centre - margin), math.ceil(centre + margin)
    return Bracket(float(ordered[low]) if low >= 0 else None, float(ordered[high]) if high < n else None)


def kth_smallest(values: torch.Tensor, rank: int) -> float:
    """The rank-th smallest entry of `values` (1-based, as torch.kthvalue)."""
    flat = values.reshape(-1)
    if flat.numel() <= DIRECT:
        return float(flat.kthvalue(rank).values)
    stride = math.ceil(flat.numel() / SAMPLE)
    found = bracket(flat[::stride], rank, flat.numel())
    found.scan(flat)
    picked = found.pick(rank)
    return float(flat.kthvalue(rank).values) if picked is None else picked
