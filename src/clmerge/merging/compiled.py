"""Loops that torch cannot fuse, compiled by numba: counting and gathering in one pass over the entries.

Imported on first use (numba takes about 0.4 s to import; most commands never select a threshold). The
functions release the GIL, so the threshold scans of several task vectors run on several threads at once.
Each loop is compiled on its first call in a process (0.7 s, then 0.15 s per further dtype). Not cached:
numba's cache refuses to import where neither the installed package nor $HOME is writable (read-only
cluster images), and loading a cached loop still took half the compile time.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True)
def split_magnitudes(values: np.ndarray, lo: float, hi: float, out: np.ndarray) -> tuple[int, int]:
    """(how many |values| are below lo, how many are in [lo, hi]); the ones in [lo, hi] are written to
    out[0..kept-1] in order. `out` holds at least values.size entries: every |value| is written at the
    current end, which moves only past kept ones (no branch to mispredict). NaN is neither below nor kept,
    as in torch's comparisons; lo and hi should have the dtype of `values` (compares stay vectorised)."""
    below = 0
    kept = 0
    for i in range(values.size):
        value = abs(values[i])
        below += value < lo
        out[kept] = value
        kept += (value >= lo) & (value <= hi)
    return below, kept
