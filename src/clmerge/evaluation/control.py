"""Held-out control sets for zero-shot retention (SPEC.md 5, ZR_t): data no task of the sequence trains on.

`benchmark.control` lists them: `world/<domain>` (the built-in world's 20 classes rendered in a domain the
sequence never trains on) or the name of a prepared real dataset (its full class list and default
templates). Each control set is scored with its own all-class head, like a one-task benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


from clmerge.benchmarks import Benchmark, build_benchmark
from clmerge.config import BenchmarkConfig
from clmerge.data.registry import derived_seed
from clmerge.errors import UserError


@dataclass(frozen=True)
class Control:
    """One control set: its name, its one-task benchmark (config and built) and the seed of its data."""

    name: str
    config: BenchmarkConfig
    benchmark: Benchmark
    seed: int


def control_config(cfg: BenchmarkConfig, entry: str) -> BenchmarkConfig:
    """The one-task class-incremental benchmark that evaluates the control set `entry`."""
    dataset, _, domain = entry.partition("/")
    if dataset == "world":
        from clmerge.data.world import DOMAINS

        if domain not in DOMAINS:
            raise UserError(f"benchmark.control entry '{entry}' names no world domain; "
                            f"use world/<domain> with a domain of: {', '.join(DOMAINS)}")
        templates = cfg.templates if cfg.dataset == "world" else "world"
        return replace(cfg, name=f"control_{dataset}_{domain}", setting="class_incremental", dataset="world",
                       num_tasks=1, class_order=None, domains=[], datasets=[], templates=templates,
                       world=replace(cfg.world, domain=domain))
    if domain:
        raise UserError(f"benchmark.control entry '{entry}': only world/<domain> takes a domain; "
                        "name a real dataset alone")
    return replace(cfg, name=f"control_{dataset}", setting="class_incremental", dataset=dataset, num_tasks=1,
                   class_order=None, domains=[], datasets=[], templates="default")


def controls(cfg: BenchmarkConfig, root: Optional[str], seed: int) -> list[Control]:
    """Every control set of `cfg`, in the listed order; their data seeds differ from every task's (without
    `root`, real control sets are checked by name only)."""
    if len(set(cfg.control)) != len(cfg.control):
        raise UserError(f"benchmark.control lists a set twice: {cfg.control}; list each once")
    result = []
    for entry in cfg.control:
        config = control_config(cfg, entry)
        benchmark = build_benchmark(config, root, seed)
        result.append(Control(entry, config, benchmark, derived_seed(seed, "control", entry)))
    return result
