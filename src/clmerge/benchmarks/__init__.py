"""Benchmarks: a setting (one builder function) applied to a dataset described in YAML."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from clmerge.benchmarks.class_incremental import class_incremental_tasks, resolve_class_order
from clmerge.benchmarks.domain_incremental import domain_incremental_tasks
from clmerge.benchmarks.multi_dataset import multi_dataset_tasks
from clmerge.benchmarks.types import Benchmark, HeadPart, Task
from clmerge.config import SETTINGS, BenchmarkConfig
from clmerge.data.registry import dataset_info, derived_seed
from clmerge.errors import UserError

__all__ = ["Benchmark", "HeadPart", "Task", "build_benchmark"]


def _task_order(cfg: BenchmarkConfig, listed: list[str], seed: int) -> list[str]:
    """The domains or datasets in the order `benchmark.task_order` asks for."""
    if cfg.task_order == "listed":
        return list(listed)
    if cfg.task_order == "seeded":
        generator = torch.Generator().manual_seed(derived_seed(seed, "task_order"))
        return [listed[i] for i in torch.randperm(len(listed), generator=generator).tolist()]
    raise UserError(f"unknown benchmark.task_order '{cfg.task_order}'; use listed or seeded")


def build_benchmark(cfg: BenchmarkConfig, root: Optional[Path | str] = None, seed: int = 0) -> Benchmark:
    """Build the task sequence described by `cfg`.

    `root` is the data root of real datasets: without it the class names stay empty (enough to count
    tasks or validate a config); `seed` draws the seeded class or task orders.
    """
    if cfg.setting == "multi_dataset":
        datasets = _task_order(cfg, cfg.datasets, seed)
        tasks, parts = multi_dataset_tasks(datasets, cfg.dataset_epochs, cfg.num_tasks,
                                           lambda name: dataset_info(name, cfg.templates, root))
        classnames = tuple(name for part in parts for name in part.classnames)
        return Benchmark(name=cfg.name, setting=cfg.setting, dataset=cfg.dataset, classnames=classnames,
                         templates=(), tasks=tasks, num_classes=sum(len(t.classes) for t in tasks),
                         parts=parts)
    info = dataset_info(cfg.dataset, cfg.templates, root)
    order: list[int] = []
    if cfg.setting == "class_incremental":
        order = resolve_class_order(cfg.class_order, info.num_classes, info.class_order,
                                    derived_seed(seed, "class_order"))
        tasks = class_incremental_tasks(order, cfg.num_tasks)
    elif cfg.setting == "domain_incremental":
        tasks = domain_incremental_tasks(_task_order(cfg, cfg.domains, seed), info.domains, info.num_classes,
                                         cfg.num_tasks)
    else:
        raise UserError(f"unknown benchmark.setting '{cfg.setting}'; valid settings: {', '.join(SETTINGS)}")
    tasks = tuple(replace(task, epochs=cfg.epochs) for task in tasks)
    return Benchmark(name=cfg.name, setting=cfg.setting, dataset=cfg.dataset, classnames=info.classnames,
                     templates=info.templates, tasks=tasks, num_classes=info.num_classes,
                     class_order=tuple(order))
