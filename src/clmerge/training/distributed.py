"""Data parallelism under torchrun: one process per device, the same global batch as one process.

Every rank draws the same seeded, shuffled global batch (the order of a single process) and takes its
contiguous slice; each rank's loss is weighted by its share of the global batch, and the gradients are
summed over ranks (one all-reduce per optimizer step), so the step equals the single-process step on the
whole batch up to summation order. Rank 0 alone writes to the store; the others wait at a barrier.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from clmerge.errors import UserError
from clmerge.store import CheckpointDir

DISTRIBUTED = ("auto", "on", "off")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "torchrun --nproc_per_node=N -m clmerge finetune ..."


@dataclass(frozen=True)
class Shard:
    """This process's place among the data-parallel processes (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def size(self, batch: int) -> int:
        """How many of a global batch of `batch` samples this rank trains on (contiguous, sizes differ by <= 1)."""
        return batch // self.world + (1 if self.rank < batch % self.world else 0)

    def start(self, batch: int) -> int:
        """Offset of this rank's slice in a global batch of `batch` samples."""
        return self.rank * (batch // self.world) + min(self.rank, batch % self.world)


def launched() -> bool:
    """Whether torchrun (or SLURM through torchrun) set up the environment of a process group."""
    return all(name in os.environ for name in _LAUNCHER_VARS)


def main_process() -> bool:
    """Whether this process is rank 0 of torchrun's processes (or runs alone): the one that logs and evaluates."""
    return os.environ.get("RANK", "0") == "0"


def check_distributed(mode: str) -> None:
    """Reject an unknown mode, or `on` without a launcher environment (one line naming the command)."""
    if mode not in DISTRIBUTED:
        raise UserError(f"unknown finetune.distributed '{mode}'; valid: {', '.join(DISTRIBUTED)}")
    if mode == "on" and not launched():
        missing = ", ".join(name for name in _LAUNCHER_VARS if name not in os.environ)
        raise UserError(f"finetune.distributed=on but the launcher environment is missing ({missing}); "
                        f"run {LAUNCH_HINT} (or finetune.distributed=auto for one process)")


def join(mode: str, device: torch.device) -> tuple[Shard, torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU; left at exit); returns this rank's shard and
    device (cuda:LOCAL_RANK on GPUs). Without a launcher, or with `off`: one process, the device unchanged."""
    check_distributed(mode)
    if mode == "off" or not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Shard(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
        atexit.register(dist.destroy_process_group)
    return Shard(dist.get_rank(), dist.get_world_size()), device


class RankStore:
    """A checkpoint directory shared by the ranks: rank 0 locks and writes; after every write all ranks meet
    at a barrier and the others re-read the manifest, so every rank takes the same skip/resume decisions."""

    def __init__(self, store: CheckpointDir, shard: Shard) -> None:
        self.store, self.shard = store, shard
        barrier(shard)  # every rank has read the manifest before rank 0 changes it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def lock(self) -> ContextManager[None]:
        return self.store.lock() if self.shard.main else contextlib.nullcontext()

    def save(self, name: str, tensors: dict[str, torch.Tensor], **info: Any) -> None:
        if self.shard.main:
            self.store.save(name, tensors, **info)
        self._sync()

    def write_manifest(self) -> None:
        if self.shard.main:
            self.store.write_manifest()
        self._sync()

    def _sync(self) -> None:
        barrier(self.shard)
        if not self.shard.main:
            self.store.manifest = CheckpointDir(self.store.path, {}).manifest


def barrier(shard: Shard) -> None:
    """Wait for every rank (no-op in one process)."""
    if shard.world > 1:
        dist.barrier()


def from_main(value: bool, shard: Shard) -> bool:
    """Rank 0's `value` on every rank (each rank may have read the store at another moment)."""
    if shard.world == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return bool(shared[0])


def all_reduce_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Sum the gradients and the loss over ranks in one flat all-reduce; returns the summed loss."""
    if shard.world == 1:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().float().reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return flat[-1]


class _Slices(Sampler[list[int]]):
    """This rank's contiguous slice of every global batch (one index stands in for an empty slice)."""

    def __init__(self, batches: Sampler[list[int]], shard: Shard) -> None:
        self.batches, self.shard = batches, shard

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            start = self.shard.start(len(batch))
            yield batch[start:start + self.shard.size(len(batch))] or batch[:1]


class GlobalBatches:
    """Yields (images, labels, global batch size): this rank's slice of each global batch `batches` draws
    (training/batches.py: the seeded shuffled order, from any step on)."""

    def __init__(self, dataset: Dataset, batches: Sampler[list[int]], shard: Shard, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.shard, self.batches = shard, batches
        self.loader = DataLoader(dataset, batch_sampler=_Slices(batches, shard), num_workers=num_workers,
                                 pin_memory=pin_memory)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for batch, (images, labels) in zip(self.batches, self.loader):
            size = len(batch)
            if self.shard.size(size) == 0:
                images, labels = images[:0], labels[:0]
            yield images, labels, size

