"""Benchmarks: a setting (one builder function) applied to a dataset described in YAML."""

from __future__ import annotations

from clmerge.benchmarks.class_incremental import check_class_order, class_incremental_tasks
from clmerge.benchmarks.domain_incremental import domain_incremental_tasks
from clmerge.benchmarks.types import Benchmark, Task
from clmerge.config import SETTINGS, BenchmarkConfig
from clmerge.data.registry import dataset_info
from clmerge.errors import UserError

__all__ = ["Benchmark", "Task", "build_benchmark"]


def build_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """Build the task sequence described by `cfg`."""
    info = dataset_info(cfg.dataset, cfg.templates)
    if cfg.setting == "class_incremental":
        order = check_class_order(cfg.class_order, len(info.classnames))
        tasks = class_incremental_tasks(order, cfg.num_tasks)
    elif cfg.setting == "domain_incremental":
        tasks = domain_incremental_tasks(cfg.domains, info.domains, len(info.classnames), cfg.num_tasks)
    else:
        raise UserError(f"unknown benchmark.setting '{cfg.setting}'; valid settings: {', '.join(SETTINGS)}")
    return Benchmark(name=cfg.name, setting=cfg.setting, dataset=cfg.dataset, classnames=info.classnames,
                     templates=info.templates, tasks=tasks)
