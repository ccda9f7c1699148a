"""Dataset registry: class names, domains, templates and per-task splits of every known dataset."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from clmerge.benchmarks.types import Task
from clmerge.config import BenchmarkConfig
from clmerge.errors import UserError

DATASETS = ("world",)


@dataclass(frozen=True)
class DatasetInfo:
    """What a benchmark needs to know about a dataset before loading any image."""

    classnames: tuple[str, ...]
    domains: tuple[str, ...]
    templates: tuple[str, ...]


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one purpose (e.g. ("data", "train", 3)), independent across purposes."""
    text = ":".join(str(part) for part in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def dataset_info(dataset: str, templates: str) -> DatasetInfo:
    """Class names, domains and the template set `templates` of `dataset`."""
    if dataset != "world":
        raise UserError(f"unknown dataset '{dataset}'; valid datasets: {', '.join(DATASETS)}")
    from clmerge.data import world

    if templates not in world.TEMPLATES:
        raise UserError(f"unknown template set '{templates}' for dataset world; "
                        f"valid: {', '.join(sorted(world.TEMPLATES))}")
    return DatasetInfo(tuple(world.CLASSNAMES), tuple(world.DOMAINS), tuple(world.TEMPLATES[templates]))


def task_split(cfg: BenchmarkConfig, task: Task, split: str, seed: int) -> Dataset:
    """The images of `task` in `split` ("train", "val" or "test"), as model-ready tensors with global labels."""
    if cfg.dataset != "world":
        raise UserError(f"unknown dataset '{cfg.dataset}'; valid datasets: {', '.join(DATASETS)}")
    from clmerge.data import world

    per_class = {"train": cfg.world.train_per_class, "val": cfg.world.val_per_class,
                 "test": cfg.world.test_per_class}[split]
    domain = task.domain or cfg.world.domain
    images, labels = world.render_split(task.classes, domain, per_class,
                                        derived_seed(seed, "data", task.index), split)
    return TensorDataset(world.to_model_input(images), labels.to(torch.int64))
