"""The test splits of all tasks, decoded once per run and reused by every evaluated model.

Model-ready tensors (the built-in world) stay in memory. Images that go through a transform (real
datasets) are decoded once into a memory-mapped .npy file and streamed back batch by batch, so a large
test set (DomainNet: about 100 GB as fp32 at 224 px) never sits in memory whole. When the transform ends
with `Normalize` over `ToTensor` pixels, the file holds the exact uint8 pixels (a quarter of fp32) and
`Normalize` runs on each batch read back: bit-identical to transforming every image again.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import Compose, Normalize

from clmerge.config import BenchmarkConfig, Config
from clmerge.data.registry import task_split

if TYPE_CHECKING:
    from clmerge.benchmarks import Benchmark

Images = torch.Tensor | np.ndarray
DECODE_BATCH = 256


@dataclass(frozen=True)
class TestSet:
    """Images of every task's test split (in memory or memory-mapped), labels, task index per sample and the
    classes of each task."""

    images: Images
    labels: torch.Tensor
    task_ids: torch.Tensor
    task_columns: torch.Tensor  # [T, C] bool: the classes of each task
    normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # applied to memory-mapped pixels

    @property
    def num_tasks(self) -> int:
        return self.task_columns.shape[0]

    def __len__(self) -> int:
        return len(self.labels)

    def sizes(self) -> list[int]:
        """n_j: number of test samples of each task."""
        return torch.bincount(self.task_ids, minlength=self.num_tasks).tolist()

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Model-ready fp32 images [start:stop]."""
        if isinstance(self.images, torch.Tensor):
            return self.images[start:stop]
        pixels = torch.from_numpy(np.array(self.images[start:stop]))  # a writable copy of the mapped rows
        images = pixels.float().div(255) if pixels.dtype == torch.uint8 else pixels
        return self.normalize(images) if self.normalize is not None else images


def split_normalize(transform: Any) -> tuple[Any, Optional[Normalize]]:
    """(pixel transform, final Normalize) of a Compose that ends with Normalize; else (transform, None)."""
    if isinstance(transform, Compose) and transform.transforms and isinstance(transform.transforms[-1], Normalize):
        return Compose(transform.transforms[:-1]), transform.transforms[-1]
    return transform, None


def _columns(task_classes: list[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    columns = torch.zeros(len(task_classes), num_classes, dtype=torch.bool)
    for index, classes in enumerate(task_classes):
        columns[index, list(classes)] = True
    return columns


def _task_ids(splits: list[Dataset]) -> torch.Tensor:
    return torch.cat([torch.full((len(split),), index, dtype=torch.int64) for index, split in enumerate(splits)])


def collect_test_set(splits: list[Dataset], task_classes: list[tuple[int, ...]], num_classes: int,
                     cache: Optional[Path] = None, normalize: Optional[Normalize] = None,
                     num_workers: int = 0) -> TestSet:
    """Decode every task's split once. In memory, unless `cache` names a .npy file and some split is not a
    TensorDataset: then the images are written there (uint8 when `normalize` is given, so the splits must
    yield ToTensor pixels) and memory-mapped."""
    columns = _columns(task_classes, num_classes)
    ready = all(isinstance(split, TensorDataset) for split in splits)  # model-ready tensors: no transform
    if ready or cache is None:
        images, labels = [], []
        for split in splits:
            for batch_images, batch_labels in DataLoader(split, batch_size=DECODE_BATCH,
                                                         num_workers=0 if ready else num_workers):
                images.append(batch_images if ready or normalize is None else normalize(batch_images))
                labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
        return TestSet(torch.cat(images), torch.cat(labels), _task_ids(splits), columns)
    images_file, labels = _decode_to_file(splits, cache, as_uint8=normalize is not None, num_workers=num_workers)
    return TestSet(images_file, labels, _task_ids(splits), columns, normalize)


def _decode_to_file(splits: list[Dataset], path: Path, as_uint8: bool, num_workers: int) -> tuple[np.ndarray,
                                                                                                   torch.Tensor]:
    """Write every split's transformed images into one .npy file; returns it memory-mapped, and the labels."""
    total = sum(len(split) for split in splits)
    shape = tuple(splits[0][0][0].shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8 if as_uint8 else np.float32,
                                      shape=(total, *shape))
    labels, offset = [], 0
    for split in splits:
        for images, batch_labels in DataLoader(split, batch_size=DECODE_BATCH, num_workers=num_workers):
            if as_uint8:
                pixels = images.mul(255).round().to(torch.uint8)
                if not torch.equal(pixels.float().div(255), images):
                    raise ValueError("the eval transform before Normalize does not yield ToTensor pixels")
                images = pixels
            array[offset:offset + len(images)] = images.numpy()
            offset += len(images)
            labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    array.flush()
    del array
    return np.load(path, mmap_mode="r"), torch.cat(labels)


@contextmanager
def decoded_split(cfg: Config, bench_cfg: BenchmarkConfig, benchmark: Benchmark, seed: int, transform: Callable,
                  work_dir: Path, split: str = "test") -> Iterator[TestSet]:
    """Every task's `split` ("test", or "val" for merge.alpha=auto), decoded once through the eval `transform`
    (real images into a memory-mapped file under `work_dir`, or eval.image_cache_dir, deleted on exit)."""
    pixels, normalize = split_normalize(transform)
    cache = Path(cfg.eval.image_cache_dir or work_dir) / f".{split}_images-{os.getpid()}-{benchmark.name}.npy"
    try:
        yield collect_test_set([task_split(bench_cfg, task, split, seed, cfg.paths.data, pixels)
                                for task in benchmark.tasks],
                               [task.classes for task in benchmark.tasks], benchmark.num_classes,
                               cache=cache, normalize=normalize, num_workers=cfg.eval.num_workers)
    finally:
        cache.unlink(missing_ok=True)
