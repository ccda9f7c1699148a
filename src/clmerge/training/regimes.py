"""Regimes: how a sequence of tasks is trained (SPEC.md 1.1, 1.2): where each task starts, what the loop
of a task adds (`TaskHooks`), and which files a finished task leaves in the store.

A regime works in the trained space of its `Tower`: tower deltas from theta_0 (full fine-tuning) or LoRA
factors. It rebuilds whatever state it carries across tasks from the store (never from memory of an
earlier task), so a run resumed after any task computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Protocol

import torch
from torch.utils.data import ConcatDataset, Dataset

from clmerge.benchmarks import Benchmark, Task
from clmerge.config import Config, FinetuneConfig
from clmerge.data.registry import task_split
from clmerge.merging.engine import merge_final
from clmerge.merging.job import merge_params
from clmerge.merging.methods import get_method
from clmerge.merging.reader import TensorFile
from clmerge.merging.sources import MemoryVector
from clmerge.models.lora import Adapters, check_lora, dense_delta, init_factors
from clmerge.models.tower import load_tower, task_vector
from clmerge.store import CheckpointDir, global_file, lora_file, task_file
from clmerge.training.ewc import EWC
from clmerge.training.finetune import TaskHooks, effective_recipe, steps_per_task
from clmerge.training.lwf import LwF
from clmerge.training.pam import AlignmentLog, align, sign_conflicts, top_masks

Tensors = dict[str, torch.Tensor]


class FullTower:
    """Full fine-tuning: the trained vector is the tower's delta from theta_0 (the task vector itself)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], base: Tensors) -> None:
        self.model, self.base = model, base
        names = {id(p): n for n, p in model.named_parameters()}
        self.named = {names[id(p)]: p for p in params}

    def begin(self, start: Optional[Tensors]) -> None:
        """Set the tower to theta_0 + start (theta_0 when None)."""
        load_tower(self.model, self.base, start)

    def params(self) -> dict[str, torch.nn.Parameter]:
        """The tensors being trained, by key."""
        return self.named

    def offsets(self) -> dict[str, Optional[torch.Tensor]]:
        """What a trained tensor is relative to (theta_0's weight)."""
        device = next(iter(self.named.values())).device
        return {key: self.base[key].to(device) for key in self.named}

    def end(self) -> Tensors:
        return task_vector(self.model, self.base)

    def vector_file(self, index: int) -> str:
        return task_file(index)

    def files(self, index: int, vector: Tensors) -> dict[str, Tensors]:
        return {task_file(index): vector}

    def recipe(self, cfg: FinetuneConfig) -> FinetuneConfig:
        return cfg


class LoraTower:
    """LoRA: the trained vector is the adapters' factors; the task file holds their dense delta."""

    def __init__(self, model: torch.nn.Module, base: Tensors, cfg: Config, seed: int) -> None:
        self.model, self.base, self.cfg = model, base, cfg.finetune.lora
        self.sites = check_lora(self.cfg, model)
        for p in model.parameters():  # only the factors train
            p.requires_grad_(False)
        self.initial = init_factors(self.sites, self.cfg.r, seed)
        self.adapters: Optional[Adapters] = None

    def begin(self, start: Optional[Tensors]) -> None:
        """Attach adapters to the tower at theta_0, holding `start` (the seeded init when None)."""
        load_tower(self.model, self.base)
        self.adapters = Adapters(self.sites, self.cfg)
        self.adapters.load(start if start is not None else self.initial)

    def params(self) -> dict[str, torch.nn.Parameter]:
        """The attached factors, by key (between begin and end)."""
        assert self.adapters is not None
        return {f"{key}.lora_{part}": getattr(delta, f"lora_{part}")
                for key, delta in self.adapters.deltas.items() for part in ("A", "B")}

    def offsets(self) -> dict[str, Optional[torch.Tensor]]:
        return {key: None for key in self.initial}

    def end(self) -> Tensors:
        assert self.adapters is not None
        factors = self.adapters.factors()
        self.adapters.detach()
        self.adapters = None
        return factors

    def vector_file(self, index: int) -> str:
        return lora_file(index)

    def files(self, index: int, vector: Tensors) -> dict[str, Tensors]:
        return {lora_file(index): vector, task_file(index): dense_delta(vector, self.base, self.adapters_scale)}

    @property
    def adapters_scale(self) -> float:
        return self.cfg.alpha / self.cfg.r

    def recipe(self, cfg: FinetuneConfig) -> FinetuneConfig:
        return replace(cfg, lr=self.cfg.lr)


Tower = FullTower | LoraTower


@dataclass
class RegimeContext:
    """What every regime may use: the run's config and store, the model, its trained tower parameters
    `params` (full fine-tuning) and theta_0 of the tower, the trained space (`tower`), the benchmark, its
    all-class head, the device and the model's transforms (real images; the world needs none)."""

    cfg: Config
    store: CheckpointDir
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    base: Tensors
    tower: Tower
    benchmark: Benchmark
    head_all: torch.Tensor
    device: torch.device
    train_transform: Optional[Callable] = None
    eval_transform: Optional[Callable] = None
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # task index -> manifest additions


class Regularizer(Protocol):
    """An extra loss term of a task sequence (EWC, LwF) and the files it keeps across tasks."""

    def hooks(self, task: Task) -> TaskHooks: ...

    def finish(self, task: Task) -> dict[str, Tensors]: ...


_REGULARIZERS: dict[str, Callable[[RegimeContext], Regularizer]] = {"ewc": EWC, "lwf": LwF}


class Sequential:
    """Sequential fine-tuning: task t starts from what task t-1 ended with, read from the store;
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
        return self.ctx.tower.recipe(self.recipes[task.index])

    def start(self, task: Task) -> Optional[Tensors]:
        """The trained-space vector task `task` starts from; None = theta_0 (or the seeded LoRA init)."""
        if task.index == 0:
            return None
        return self.ctx.store.load(self.ctx.tower.vector_file(task.index - 1))

    def hooks(self, task: Task, dataset: Dataset) -> TaskHooks:
        """Additions to the loop of `task`: the regularizer's term, if any."""
        return self.regularizer.hooks(task) if self.regularizer else TaskHooks()

    def finish(self, task: Task, vector: Tensors) -> dict[str, Tensors]:
        """Files to store for a finished task, the task vector last (its presence marks the task done)."""
        extra = self.regularizer.finish(task) if self.regularizer else {}
        return {**extra, **self.ctx.tower.files(task.index, vector)}

    def record(self, task: Task) -> dict[str, Any]:
        """Extra fields of the task's manifest record."""
        return self.ctx.records.get(task.index, {})


class Independent(Sequential):
    """Independent fine-tuning: every task starts from theta_0 (or the seeded LoRA init)."""

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
        return self.ctx.tower.recipe(replace(self.ctx.cfg.finetune, steps=steps))


class Pam(Sequential):
    """PAM (SPEC.md 1.2): task t starts from the global phi_{t-1}; its vector psi is aligned to phi_{t-1}
    every K steps; then phi_t = merge(psi_1..psi_t) with the `pam` (pairwise mean) or `average` (running
    mean) merge method, through the same engine as `clmerge merge`, and stored as global_<t>."""

    def __init__(self, ctx: RegimeContext) -> None:
        super().__init__(ctx)
        self._aligned_to: Optional[tuple[Tensors, Tensors]] = None  # (phi_{t-1}, masks) of the current task

    def start(self, task: Task) -> Optional[Tensors]:
        if task.index == 0:
            return None
        return self.ctx.store.load(global_file(task.index - 1))

    def hooks(self, task: Task, dataset: Dataset) -> TaskHooks:
        pam = self.ctx.cfg.finetune.pam
        if task.index == 0 or pam.p == 0:
            return TaskHooks()
        phi = self.start(task)
        assert phi is not None
        masks = top_masks(phi, pam.p, pam.scope)
        log = AlignmentLog()
        tower = self.ctx.tower
        offsets = tower.offsets()

        def after_step(step: int, total: int, optimizer: torch.optim.Optimizer) -> None:
            if step % pam.every == 0 or (pam.align_at_end and step == total):
                params = tower.params()
                moments = ({key: [optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]]
                            for key, p in params.items()} if pam.reset_moments else None)
                align(params, offsets, phi, masks, pam.reset, log, moments)
                self.ctx.records[task.index] = {"pam": log.to_json()}

        self._aligned_to = (phi, masks)
        return TaskHooks(after_step=after_step)

    def finish(self, task: Task, vector: Tensors) -> dict[str, Tensors]:
        if self._aligned_to is not None:
            phi, masks = self._aligned_to
            self._aligned_to = None
            record = self.ctx.records.setdefault(task.index, {"pam": AlignmentLog().to_json()})
            record["pam"].update(sign_conflicts(vector, phi, masks))
        return {global_file(task.index): self._merged(task, vector), **self.ctx.tower.files(task.index, vector)}

    def _merged(self, task: Task, vector: Tensors) -> Tensors:
        """phi_t: the configured merge of psi_1..psi_t (earlier ones from the store, psi_t in memory)."""
        name = "pam" if self.ctx.cfg.finetune.pam.merge == "pairwise_mean" else "average"
        method = get_method(name)
        with ExitStack() as stack:
            sources = [stack.enter_context(TensorFile(self.ctx.store.verified_path(self.ctx.tower.vector_file(i))))
                       for i in range(task.index)]
            return merge_final([*sources, MemoryVector(vector)], method, merge_params(self.ctx.cfg, method))


_REGIMES: dict[str, type[Sequential]] = {"sequential": Sequential, "independent": Independent, "joint": Joint,
                                         "pam": Pam}


def own_merge(finetune: FinetuneConfig) -> Optional[str]:
    """The merge a PAM run deploys (pam, or average for pam.merge=running_mean); None for other regimes."""
    if finetune.regime != "pam":
        return None
    return "pam" if finetune.pam.merge == "pairwise_mean" else "average"


def evaluated_methods(cfg: Config) -> list[str]:
    """eval.methods, plus a PAM run's own merge; none for joint training (one model, nothing to merge)."""
    if cfg.finetune.regime == "joint":
        return []
    own = own_merge(cfg.finetune)
    return list(dict.fromkeys([*([own] if own else []), *cfg.eval.methods]))


def make_regime(ctx: RegimeContext) -> Sequential:
    """The regime `finetune.regime` names (validated by check_recipe)."""
    return _REGIMES[ctx.cfg.finetune.regime](ctx)


def make_tower(cfg: Config, model: torch.nn.Module, params: list[torch.nn.Parameter], base: Tensors,
               seed: int) -> Tower:
    """The trained space `finetune.adapter` names."""
    if cfg.finetune.adapter == "lora":
        return LoraTower(model, base, cfg, seed)
    return FullTower(model, params, base)
