"""Dataset registry: class names, domains, templates and per-task splits of every known dataset.

The built-in synthetic world renders its own model-ready tensors; real datasets (docs/benchmarks.md) are
read from their prepared layout under the data root and go through the model's transform.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from clmerge.config import BenchmarkConfig
from clmerge.data import catalog, reference
from clmerge.data.images import Transform
from clmerge.errors import UserError

if TYPE_CHECKING:
    from clmerge.benchmarks.types import Task

DATASETS = ("world", *catalog.SPECS)


@dataclass(frozen=True)
class DatasetInfo:
    """What a benchmark needs to know about a dataset before loading any image."""

    classnames: tuple[str, ...]  # prompt names in label order; empty when built without the data root
    domains: tuple[str, ...]
    templates: tuple[str, ...]
    num_classes: int
    class_order: Optional[list[int]] = None  # the reference class order; None = natural


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one purpose (e.g. ("data", "train", 3)), independent across purposes."""
    text = ":".join(str(part) for part in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def dataset_info(dataset: str, templates: str, root: Optional[Path | str] = None) -> DatasetInfo:
    """Class names, domains and the template set `templates` of `dataset`.

    For a real dataset, `templates="default"` is the reference's set for it, and the class names are read
    from the prepared data under `root` (left empty when `root` is None: only the structure is known).
    """
    if dataset == "world":
        from clmerge.data import world

        if templates not in world.TEMPLATES:
            raise UserError(f"unknown template set '{templates}' for dataset world; "
                            f"valid: {', '.join(sorted(world.TEMPLATES))}")
        return DatasetInfo(tuple(world.CLASSNAMES), tuple(world.DOMAINS), tuple(world.TEMPLATES[templates]),
                           len(world.CLASSNAMES))
    from clmerge.data.real import classnames

    spec = catalog.spec(dataset)
    key = reference.template_key(spec.reference) if templates == "default" else templates
    names = classnames(dataset, Path(root)) if root is not None else ()
    return DatasetInfo(names, spec.domains(), reference.templates(key), spec.num_classes,
                       reference.class_order(spec.reference))


def task_split(cfg: BenchmarkConfig, task: Task, split: str, seed: int, root: Path | str = "data",
               transform: Optional[Transform] = None) -> Dataset:
    """The images of `task` in `split` ("train", "val" or "test") with global labels.

    World images come as model-ready tensors (its "val" images are rendered apart from the training ones);
    real images go through `transform` (the model's train transform for training, its eval transform for
    every evaluation). A real task's "val" split is carved from its training images (`held_out`) and
    "train" is then the rest; with `cfg.val_fraction` 0 it has none.
    """
    dataset = task.dataset or cfg.dataset
    if dataset == "world":
        from clmerge.data import world

        per_class = {"train": cfg.world.train_per_class, "val": cfg.world.val_per_class,
                     "test": cfg.world.test_per_class}[split]
        domain = task.domain or cfg.world.domain
        images, labels = world.render_split(task.classes, domain, per_class,
                                            derived_seed(seed, "data", task.index), split)
        return TensorDataset(world.to_model_input(images), labels.to(torch.int64))
    from clmerge.data.real import load_split

    if transform is None:
        raise ValueError("real images need the model's transform")
    if split == "val" and cfg.val_fraction <= 0:
        raise UserError(f"task {task.name} has no validation images: benchmark.val_fraction is 0; set "
                        "benchmark.val_fraction=0.1 and fine-tune again, which holds that share of the training "
                        "images out")
    local = [c - task.label_offset for c in task.classes]
    stored = "train" if split == "val" else split
    data = load_split(dataset, Path(root), stored, transform, local, task.domain, task.label_offset,
                      cfg.skip_corrupt)
    if len(data) == 0:
        raise UserError(f"task {task.name} has no {stored} images in the prepared {dataset} under {root}; "
                        f"check it with `clmerge data check {dataset} --root {root}`")
    if stored == "train" and cfg.val_fraction > 0:
        val = held_out(data.labels, cfg.val_fraction, derived_seed(seed, "val", task.index))
        if split == "val" and not val:
            raise UserError(f"task {task.name} has no validation images: each of its classes has one training "
                            "image; raise benchmark.val_fraction or give a number, e.g. merge.alpha=0.5")
        chosen = set(val)
        data = Subset(data, val if split == "val" else [i for i in range(len(data)) if i not in chosen])
    return data


def held_out(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """The validation images among a task's training images: in each class, round(fraction x its images) of
    them, at least one of a class with two or more (and never all of one), drawn with `seed`; sorted."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        order = torch.randperm(len(members), generator=generator)[:count]
        chosen += [members[i] for i in order.tolist()]
    return sorted(chosen)
