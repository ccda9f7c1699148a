"""Regimes: how a sequence of tasks is trained (SPEC.md 1.1): where each task starts, what the loop of a
task adds (`TaskHooks`), and which files a finished task leaves in the store.

A regime rebuilds whatever state it carries across tasks from the store (never from memory of an earlier
task), so a run resumed after any task computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Protocol

import torch
from torch.utils.data import ConcatDataset, Dataset

from clmerge.benchmarks import Benchmark, Task
from clmerge.config import Config, FinetuneConfig
from clmerge.data.registry import task_split
from clmerge.store import CheckpointDir, task_file
from clmerge.training.ewc import EWC
from clmerge.training.finetune import TaskHooks, effective_recipe, steps_per_task
from clmerge.training.lwf import LwF

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
    train_transform: Optional[Callable] = None  # the model's transforms (real images; the world needs none)
    eval_transform: Optional[Callable] = None


class Regularizer(Protocol):
    """An extra loss term of a task sequence (EWC, LwF) and the files it keeps across tasks."""

    def hooks(self, task: Task) -> TaskHooks: ...

    def finish(self, task: Task) -> dict[str, Tensors]: ...


_REGULARIZERS: dict[str, Callable[[RegimeContext], Regularizer]] = {"ewc": EWC, "lwf": LwF}


class Sequential:
    """Sequential fine-tuning: task t starts from theta_{t-1} = theta_0 + tau_{t-1}, read from the store;
    `finetune.regularizer` adds EWC's or LwF's term to every task."""

    def __init__(self, ctx: RegimeContext) -> None:
        self.ctx = ctx
        # every task's recipe up front: a missing epochs value fails before any training
        self.recipes = [effective_recipe(ctx.cfg.finetune, task.epochs) for task in ctx.benchmark.tasks]
        name = ctx.cfg.finetune.regularizer
        self.regularizer = _REGULARIZERS[name](ctx) if name in _REGULARIZERS else None

    def tasks(self) -> tuple[Task, ...]:
        """The tasks this regime trains, in order; each leaves the task vector task_file(task.index)."""
        return self.ctx.benchmark.tasks

    def train_set(self, task: Task) -> Dataset:
        """The training images of `task` (the model's train transform)."""
        ctx = self.ctx
        return task_split(ctx.cfg.benchmark, task, "train", ctx.cfg.seed, ctx.cfg.paths.data, ctx.train_transform)

    def recipe(self, task: Task, dataset: Dataset) -> FinetuneConfig:
        """The fine-tuning recipe of `task`."""
        return self.recipes[task.index]

    def start(self, task: Task) -> Optional[Tensors]:
        """The vector (relative to theta_0) task `task` starts from; None = theta_0."""
        return self.ctx.store.load(task_file(task.index - 1)) if task.index > 0 else None

    def hooks(self, task: Task, dataset: Dataset) -> TaskHooks:
        """Additions to the loop of `task`: the regularizer's term, if any."""
        return self.regularizer.hooks(task) if self.regularizer else TaskHooks()

    def finish(self, task: Task, tau: Tensors) -> dict[str, Tensors]:
        """Files to store for a finished task, the task vector last (its presence marks the task done)."""
        extra = self.regularizer.finish(task) if self.regularizer else {}
        return {**extra, task_file(task.index): tau}


class Independent(Sequential):
    """Independent fine-tuning: every task starts from theta_0."""

    def start(self, task: Task) -> Optional[Tensors]:
        return None


class Joint(Sequential):
    """Joint training (the upper bound): one model trained from theta_0 on the union of every task's training
    data with the all-class head, for as many optimizer steps as the sequential run takes over all tasks.
    Its vector is the store's only one, task_file(0)."""

    def tasks(self) -> tuple[Task, ...]:
        classes = sorted({c for task in self.ctx.benchmark.tasks for c in task.classes})
        return (Task(index=0, name="joint", classes=tuple(classes)),)

    def start(self, task: Task) -> Optional[Tensors]:
        return None

    def train_set(self, task: Task) -> ConcatDataset:
        return ConcatDataset([Sequential.train_set(self, each) for each in self.ctx.benchmark.tasks])

    def recipe(self, task: Task, dataset: Dataset) -> FinetuneConfig:
        assert isinstance(dataset, ConcatDataset)
        steps = sum(steps_per_task(recipe, len(part)) for recipe, part in zip(self.recipes, dataset.datasets))
        return replace(self.ctx.cfg.finetune, steps=steps)


_REGIMES: dict[str, type[Sequential]] = {"sequential": Sequential, "independent": Independent, "joint": Joint}


def make_regime(ctx: RegimeContext) -> Sequential:
    """The regime `finetune.regime` names (validated by check_recipe)."""
    return _REGIMES[ctx.cfg.finetune.regime](ctx)
