"""The engine's flat index: a task vector's floating tensors laid end to end, in the first file's order.

The engine folds task vectors chunk by chunk along this index, not tensor by tensor: position-free folds
(MagMax, sums, TIES with a global threshold) take chunks that cross tensor boundaries, so a chunk is one
`preadv` per file however small the tensors are (ViT-B/16 has 152 tensors, most of a few hundred
entries), and the merged vector is one flat block whose tensors are views. Folds that draw per tensor
(random mix) take chunks within one tensor; sparsifiers that need a whole tensor (DARE, per-tensor TopK)
take whole tensors.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


def _balanced(entries: int, size: int) -> int:
    """The chunk length that cuts `entries` into the fewest chunks of at most `size`, as equal as 1024-entry
    alignment allows."""
    if entries <= size:
        return entries
    step = -(-entries // -(-entries // size))
    return min(size, -(-step // 1024) * 1024) if size >= 1024 else step


@dataclass(frozen=True)
class Piece:
    """Entries [start, start + count) of tensor `name`, at `offset` within a chunk."""

    name: str
    start: int
    count: int
    offset: int


class Layout:
    """Floating tensors of these shapes, in this order, end to end."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.names = list(shapes)
        self.sizes = [math.prod(shape) for shape in shapes.values()]
        self.starts = [0]
        for size in self.sizes:
            self.starts.append(self.starts[-1] + size)
        self.total = self.starts.pop()
        self.largest = max(self.sizes, default=0)

    def pieces(self, begin: int, count: int) -> list[Piece]:
        """The tensor pieces that flat entries [begin, begin + count) cover, in order."""
        found, index, end = [], bisect.bisect_right(self.starts, begin) - 1, begin + count
        while begin < end:
            start, size = self.starts[index], self.sizes[index]
            length = min(end, start + size) - begin
            found.append(Piece(self.names[index], begin - start, length, count - (end - begin)))
            begin += length
            index += 1
        return found

    def chunks(self, size: Optional[int], within_tensors: bool) -> Iterator[tuple[int, int]]:
        """(begin, count) chunks covering every entry: `size` entries each (None: whole tensors), crossing
        tensor boundaries unless `within_tensors`. Within tensors, a tensor is cut into equal chunks of at
        most `size` (1024-aligned where it is larger than that): no small remainder that would fall below
        the size kernels compile for."""
        if not within_tensors:
            assert size is not None
            yield from ((begin, min(size, self.total - begin)) for begin in range(0, self.total, size))
            return
        for start, entries in zip(self.starts, self.sizes):
            step = entries if size is None else _balanced(entries, size)
            yield from ((start + offset, min(step, entries - offset)) for offset in range(0, entries, step))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as a view of a flat block laid out like this."""
        return {name: flat[start:start + size].view(self.shapes[name])
                for name, start, size in zip(self.names, self.starts, self.sizes)}
