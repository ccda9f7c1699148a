"""The engine's large buffers: allocated once per merge as one flat block, backed by huge pages on Linux.

A merge writes a whole fresh vector (hundreds of MB); with 4 KiB pages the kernel takes one page fault per
4 KiB on first touch, which costs about as much as reading the task vector itself. One block per buffer,
advised MADV_HUGEPAGE (transparent huge pages in `madvise` mode), faults 2 MiB at a time. Tensors are
views of the block, in order; they share its storage, which safetensors and torch both accept.
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Mapping, Optional

import torch

HUGE = 1 << 21
MADV_HUGEPAGE = 14


def _madvise() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _madvise()


def block(entries: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised flat tensor, advised to use huge pages where its memory spans whole ones."""
    flat = torch.empty(entries, dtype=dtype)
    begin, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    first = (begin + HUGE - 1) // HUGE * HUGE
    if _MADVISE is not None and end - first >= HUGE:
        _MADVISE(first, (end - first) // HUGE * HUGE, MADV_HUGEPAGE)  # advice only: failure is harmless
    return flat


def carve(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One uninitialised tensor per name, all views of one block."""
    flat = block(sum(math.prod(shape) for shape in shapes.values()), dtype)
    views, start = {}, 0
    for name, shape in shapes.items():
        views[name] = flat[start:start + math.prod(shape)].view(shape)
        start += math.prod(shape)
    return views
