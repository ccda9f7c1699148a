"""The minibatch order of a task as a resumable batch sampler.

It draws from one generator exactly what `DataLoader(shuffle=True, generator=...)` draws per epoch (the
iterator's base seed, the epoch's permutation, then the sampler's empty tail permutation), so it keeps
the order of earlier clmerge versions; unlike a DataLoader it can start at any step, which is what a
mid-task resume needs: the batches after step k do not depend on whether the run stopped at k.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShuffledBatches(Sampler[list[int]]):
    """Batches of steps `start`..`total`-1 over reshuffled epochs of `size` examples (last batch may be short)."""

    def __init__(self, size: int, batch_size: int, seed: int, total: int, start: int = 0):
        if size < 1:
            raise ValueError("cannot draw batches from an empty dataset")
        self.size, self.batch_size, self.seed, self.total, self.start = size, batch_size, seed, total, start

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        per_epoch = math.ceil(self.size / self.batch_size)
        step = 0
        while step < self.total:
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader iterator's base seed
            order = torch.randperm(self.size, generator=generator)
            torch.randperm(self.size, generator=generator)  # RandomSampler's (empty) tail
            for batch in range(per_epoch):
                if self.start <= step < self.total:
                    yield order[batch * self.batch_size:(batch + 1) * self.batch_size].tolist()
                step += 1
