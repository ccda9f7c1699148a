"""Exact k-th smallest magnitude among many entries, without sorting them all (TIES' trim threshold).

A small sample brackets the answer in [lo, hi]; one pass counts the magnitudes below lo and keeps those in
[lo, hi]; the k-th smallest is then found among the few kept. If the sample was unlucky (the rank falls
outside the bracket) the caller falls back to a full `kthvalue`: the result is always exact.

The pass counts and gathers in one loop: numba's (merging.compiled) for fp32 and fp64 on the CPU, 0.8 ns
an entry on one thread, and it releases the GIL. Other tensors (bf16, fp16, on a GPU) take torch: a fused
kernel counts and marks (merging.kernels), then `nonzero` gathers.
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
SCAN_CHUNK = 1 << 20  # entries per call of the compiled scan (its output buffer is this long)
COMPILED = (torch.float32, torch.float64)  # dtypes the compiled scan takes, on the CPU


def _split_magnitudes(values: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(how many |values| are below lo, int32 marks of those in [lo, hi])."""
    magnitudes = values.abs()
    return (magnitudes < lo).sum(), ((magnitudes >= lo) & (magnitudes <= hi)).to(torch.int32)


SPLIT_MAGNITUDES = Kernel(_split_magnitudes)


@dataclass
class Bracket:
    """The bracket [lo, hi] (None = unbounded) and what one pass over the entries found."""

    lo: Optional[float]
    hi: Optional[float]
    below: int = 0
    candidates: list[torch.Tensor] = field(default_factory=list)

    def scan(self, values: torch.Tensor) -> None:
        """Count the |values| below lo and keep those in [lo, hi]."""
        flat = values.reshape(-1)
        lo = -math.inf if self.lo is None else self.lo
        hi = math.inf if self.hi is None else self.hi
        if flat.device.type == "cpu" and flat.dtype in COMPILED:
            self._scan_compiled(flat.detach().numpy(), lo, hi)
            return
        chunk = SPLIT_MAGNITUDES.chunk(flat.numel())
        for start in range(0, flat.numel(), chunk):
            piece = flat[start:start + chunk]
            below, marks = SPLIT_MAGNITUDES(piece, lo, hi)
            self.below += int(below)
            self.candidates.append(piece[marks.nonzero().squeeze(1)].abs())

    def _scan_compiled(self, flat: np.ndarray, lo: float, hi: float) -> None:
        from clmerge.merging.compiled import split_magnitudes  # numba: imported on first use

        bounds = np.array([lo, hi], dtype=flat.dtype)  # exact: lo and hi are magnitudes of this dtype, or inf
        out = np.empty(min(flat.size, SCAN_CHUNK), dtype=flat.dtype)
        for start in range(0, flat.size, SCAN_CHUNK):
            below, kept = split_magnitudes(flat[start:start + SCAN_CHUNK], bounds[0], bounds[1], out)
            self.below += below
            self.candidates.append(torch.from_numpy(out[:kept].copy()))

    def pick(self, rank: int) -> Optional[float]:
        """The rank-th smallest (1-based) of everything scanned, or None if it lies outside the bracket."""
        inner = rank - self.below
        kept = torch.cat(self.candidates)
        if not 1 <= inner <= kept.numel():
            return None
        if self.lo is None and self.hi is None:  # nothing was cut away: no recursion
            return float(kept.kthvalue(inner).values)
        return kth_smallest_magnitude(kept, inner)


def bracket(sample: torch.Tensor, rank: int, total: int) -> Bracket:
    """A bracket for the rank-th smallest of `total` magnitudes, from a sample of them (non-negative; about
    6 sigma each side)."""
    flat = sample.reshape(-1)
    n = flat.numel()
    centre = rank / total * n
    margin = 6.0 * math.sqrt(n) + 8.0
    low, high = math.floor(centre - margin), math.ceil(centre + margin)
    return Bracket(float(flat.kthvalue(low + 1).values) if low >= 0 else None,
                   float(flat.kthvalue(high + 1).values) if high < n else None)


def kth_smallest_magnitude(values: torch.Tensor, rank: int) -> float:
    """The rank-th smallest of |values| (1-based, as torch.kthvalue)."""
    flat = values.reshape(-1)
    if flat.numel() <= DIRECT:
        return float(flat.abs().kthvalue(rank).values)
    stride = math.ceil(flat.numel() / SAMPLE)
    found = bracket(flat[::stride].abs(), rank, flat.numel())
    found.scan(flat)
    picked = found.pick(rank)
    return float(flat.abs().kthvalue(rank).values) if picked is None else picked
