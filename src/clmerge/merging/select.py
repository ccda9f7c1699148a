"""Exact k-th smallest value among many entries, without sorting them all (TIES' trim threshold).

A small sample brackets the answer in [lo, hi]; one pass counts the entries below lo and keeps those in
[lo, hi]; the k-th smallest is then found among the few kept. If the sample was unlucky (the rank falls
outside the bracket) the caller falls back to a full `kthvalue`: the result is always exact.

The pass is one fused kernel per slice (merging.kernels) that counts and marks, then numpy's `compress`
gathers the kept entries. (Inductor writes int32 marks about 10x faster than a bool or uint8 mask, and the
gather itself cannot be fused; numpy's compress of `marks != 0` takes a third of the time of torch's
`nonzero` plus index, 1 thread; tensors numpy cannot hold, on a GPU or in bf16, take torch's gather.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from clmerge.merging.kernels import Kernel

DIRECT = 1 << 16  # below this many entries, kthvalue directly
SAMPLE = 1 << 16  # sample size of the bracket


def _split(values: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(how many entries are below lo, int32 marks of those in [lo, hi])."""
    return (values < lo).sum(), ((values >= lo) & (values <= hi)).to(torch.int32)


def _split_magnitudes(values: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_split` of |values|."""
    return _split(values.abs(), lo, hi)


SPLIT, SPLIT_MAGNITUDES = Kernel(_split), Kernel(_split_magnitudes)
NUMPY = (torch.float32, torch.float64, torch.float16)  # float dtypes numpy holds


def _kept(values: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """The entries of `values` where `marks` is not 0, in order."""
    if values.device.type == "cpu" and values.dtype in NUMPY:
        return torch.from_numpy(np.compress(marks.numpy() != 0, values.detach().numpy()))
    return values[marks.nonzero().squeeze(1)]


@dataclass
class Bracket:
    """The bracket [lo, hi] (None = unbounded) and what one pass over the entries found."""

    lo: Optional[float]
    hi: Optional[float]
    below: int = 0
    candidates: list[torch.Tensor] = field(default_factory=list)

    def scan(self, values: torch.Tensor, magnitudes: bool = False) -> None:
        """Count the entries of `values` (of |values| if `magnitudes`) below lo and keep those in [lo, hi]."""
        flat, split = values.reshape(-1), SPLIT_MAGNITUDES if magnitudes else SPLIT
        lo = -math.inf if self.lo is None else self.lo
        hi = math.inf if self.hi is None else self.hi
        chunk = split.chunk(flat.numel())
        for start in range(0, flat.numel(), chunk):
            piece = flat[start:start + chunk]
            below, marks = split(piece, lo, hi)
            self.below += int(below)
            kept = _kept(piece, marks)
            self.candidates.append(kept.abs() if magnitudes else kept)

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
    flat = sample.reshape(-1)
    n = flat.numel()
    centre = rank / total * n
    margin = 6.0 * math.sqrt(n) + 8.0
    low, high = math.floor(centre - margin), math.ceil(centre + margin)
    return Bracket(float(flat.kthvalue(low + 1).values) if low >= 0 else None,
                   float(flat.kthvalue(high + 1).values) if high < n else None)


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
