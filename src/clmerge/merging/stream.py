"""Reading task-vector tensors for the engine: one tensor ahead on a background thread.

Reads go through `preadv` into reused buffers (reader.py) and release the GIL, as do the fused kernels,
so while the engine folds one tensor the next one is read (and checked for NaN/Inf) on a second thread:
a merge takes about max(read, compute) instead of their sum.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator, Optional, Sequence

import torch

from clmerge.merging.reader import check_finite_tensor
from clmerge.merging.sources import Source

Item = tuple[Source, str]


class Reader:
    """Reads one source's floating tensors as fp32 into reused buffers (two per dtype, for read-ahead)."""

    def __init__(self, sizes: Sequence[int]):
        self.buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        self.largest = max(sizes, default=0)

    def _buffer(self, dtype: torch.dtype, slot: int) -> torch.Tensor:
        if (dtype, slot) not in self.buffers:
            self.buffers[dtype, slot] = torch.empty(self.largest, dtype=dtype)
        return self.buffers[dtype, slot]

    def read(self, source: Source, name: str, start: int = 0, count: int = -1, slot: int = 0) -> torch.Tensor:
        """Entries [start, start + count) of tensor `name` (all: count < 0), valid until `slot` is reused."""
        tensor = source.read_into(name, self._buffer(source.entries[name].dtype, slot), start, count)
        return tensor if tensor.dtype == torch.float32 else tensor.float()

    def checked(self, source: Source, name: str, slot: int = 0) -> torch.Tensor:
        """The whole tensor, refused if it has non-finite entries."""
        tau = self.read(source, name, slot=slot)
        check_finite_tensor(tau, str(source.path), name)
        return tau

    def stream(self, items: Iterable[Item]) -> Iterator[torch.Tensor]:
        """The checked tensors of `items` in order, each read while the previous one is in use; a yielded
        tensor is valid until the next one is asked for."""
        with ThreadPoolExecutor(1, thread_name_prefix="clmerge-read") as pool:
            pending: Optional[Future[torch.Tensor]] = None
            for slot, item in enumerate(items):
                ahead = pool.submit(self.checked, *item, slot % 2)
                if pending is not None:
                    yield pending.result()
                pending = ahead
            if pending is not None:
                yield pending.result()
