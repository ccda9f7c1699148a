"""Regimes: how a sequence of tasks is trained (SPEC.md 1.1): where each task starts, what the loop of a
task adds (`TaskHooks`), and which files a finished task leaves in the store.

A regime rebuilds whatever state it carries across tasks from the store (never from memory of an earlier
task), so a run resumed after any task computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from clmerge.benchmarks import Benchmark, Task
from clmerge.config import Config
from clmerge.store import CheckpointDir, task_file
from clmerge.training.finetune import TaskHooks

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RegimeContext:
    """What every regime may use: the run's config and store, the model (tower parameters `params`
    trained), theta_0 of the tower, the benchmark, its all-class head and the device."""

    cfg: Config
    store: CheckpointDir
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    base: Tensors
    benchmark: Benchmark
    head_all: torch.Tensor
    device: torch.device


class Sequential:
    """Sequential fine-tuning: task t starts from theta_{t-1} = theta_0 + tau_{t-1}, read from the store."""

    def __init__(self, ctx: RegimeContext) -> None:
        self.ctx = ctx

    def start(self, task: Task) -> Optional[Tensors]:
        """The vector (relative to theta_0) task `task` starts from; None = theta_0."""
        return self.ctx.store.load(task_file(task.index - 1)) if task.index > 0 else None

    def hooks(self, task: Task, dataset: Dataset) -> TaskHooks:
        """Additions to the loop of `task` (none for plain fine-tuning)."""
        return TaskHooks()

    def finish(self, task: Task, tau: Tensors) -> dict[str, Tensors]:
        """Files to store for a finished task, the task vector last (its presence marks the task done)."""
        return {task_file(task.index): tau}


class Independent(Sequential):
    """Independent fine-tuning: every task starts from theta_0."""

    def start(self, task: Task) -> Optional[Tensors]:
        return None


_REGIMES: dict[str, type[Sequential]] = {"sequential": Sequential, "independent": Independent}


def make_regime(ctx: RegimeContext) -> Sequential:
    """The regime `finetune.regime` names (validated by check_recipe)."""
    return _REGIMES[ctx.cfg.finetune.regime](ctx)
