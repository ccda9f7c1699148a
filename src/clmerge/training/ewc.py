"""Elastic weight consolidation (Kirkpatrick et al. 2017) as SPEC.md 3.5 defines it, without the reference's bugs.

For task t >= 2: L = CE + lamb * 1/2 * sum_p F[p] (theta[p] - theta*[p])^2, theta* = theta_{t-1}.
After task t: F <- alpha * F + (1 - alpha) * F_t (F = 0 before task 1), with the diagonal Fisher
F_t[p] = sum_b |b| (d loss_b / d p)^2 / sum_b |b|, loss_b = mean CE over batch b of task t's data (gradients
cleared before every batch) under task t's training head, labels from `finetune.ewc.fisher_labels`.
The running F after task t is stored as fisher_<t>.safetensors before the task vector, so a resumed run
reads back exactly the F an uninterrupted run holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clmerge.data.registry import derived_seed, task_split
from clmerge.models.heads import embed
from clmerge.models.tower import trained_parameters
from clmerge.store import task_file
from clmerge.training.finetune import TaskHooks, task_recipe
from clmerge.training.precision import autocast

if TYPE_CHECKING:
    from clmerge.benchmarks import Task
    from clmerge.training.regimes import RegimeContext

Tensors = dict[str, torch.Tensor]


def fisher_file(index: int) -> str:
    """File name of the running Fisher after task `index` (0-based)."""
    return f"fisher_{index:03d}.safetensors"


def _labels(logits: torch.Tensor, targets: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """argmax: the model's own prediction; sampled: a draw from softmax(logits); true: the targets."""
    if mode == "argmax":
        return logits.argmax(dim=1)
    if mode == "sampled":
        probs = logits.detach().float().softmax(dim=1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    return targets


def diagonal_fisher(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], head: torch.Tensor,
                    label_map: torch.Tensor, loader: DataLoader, labels: str, generator: torch.Generator,
                    device: torch.device, precision: str = "fp32") -> Tensors:
    """F[p] = sum_b |b| (d mean-CE_b / d p)^2 / sum_b |b| over the batches of `loader` (CPU fp32)."""
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    head, label_map = head.to(device), label_map.to(device)
    seen = 0
    for images, targets in loader:
        images, targets = images.to(device), label_map[targets.to(device)]
        model.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = embed(model, images) @ head.T
            loss = F.cross_entropy(logits, _labels(logits, targets, labels, generator))
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += len(targets) * p.grad.detach().float() ** 2
        seen += len(targets)
    model.zero_grad(set_to_none=True)
    return {name: (value / seen).cpu() for name, value in fisher.items()}


def online_fisher(previous: Optional[Tensors], current: Tensors, alpha: float) -> Tensors:
    """alpha * previous + (1 - alpha) * current; previous None = 0 (before task 1)."""
    if previous is None:
        return {name: (1 - alpha) * value for name, value in current.items()}
    return {name: alpha * previous[name] + (1 - alpha) * value for name, value in current.items()}


def ewc_penalty(params: dict[str, torch.nn.Parameter], anchor: Tensors, fisher: Tensors) -> torch.Tensor:
    """1/2 * sum_p F[p] (theta[p] - theta*[p])^2 over every trained tensor."""
    terms = [(fisher[name] * (p - anchor[name]) ** 2).sum() for name, p in params.items()]
    return 0.5 * torch.stack(terms).sum()


class EWC:
    """The EWC term of a sequential run: penalty hooks for each task, and the running Fisher it stores."""

    def __init__(self, ctx: RegimeContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.finetune.ewc
        self.params = trained_parameters(ctx.model)

    def _on_device(self, tensors: Tensors) -> Tensors:
        return {name: value.to(self.ctx.device) for name, value in tensors.items()}

    def hooks(self, task: Task) -> TaskHooks:
        """The penalty around theta_{t-1} with the Fisher stored after task t-1 (none for the first task)."""
        if task.index == 0:
            return TaskHooks()
        store, base = self.ctx.store, self.ctx.base
        previous = store.load(task_file(task.index - 1))
        anchor = self._on_device({name: base[name] + previous[name] for name in self.params})
        fisher = self._on_device(store.load(fisher_file(task.index - 1)))
        lamb = self.cfg.lamb

        def penalty(features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return lamb * ewc_penalty(self.params, anchor, fisher)

        return TaskHooks(extra_loss=penalty)

    def _fisher_data(self, task: Task) -> Dataset:
        ctx = self.ctx
        transform = ctx.eval_transform if self.cfg.fisher_transform == "eval" else ctx.train_transform
        return task_split(ctx.cfg.benchmark, task, "train", ctx.cfg.seed, ctx.cfg.paths.data, transform)

    def finish(self, task: Task) -> dict[str, Tensors]:
        """The running Fisher after `task` (none after the last task: no later task uses it)."""
        ctx = self.ctx
        if task.index == len(ctx.benchmark.tasks) - 1:
            return {}
        restrict = ctx.benchmark.setting != "domain_incremental"
        recipe = task_recipe(ctx.head_all, task.classes, restrict)
        loader = DataLoader(self._fisher_data(task), batch_size=ctx.cfg.finetune.batch_size, shuffle=False,
                            num_workers=ctx.cfg.finetune.num_workers)
        generator = torch.Generator().manual_seed(derived_seed(ctx.cfg.seed, "fisher", task.index))
        was_training = ctx.model.training
        ctx.model.eval()
        current = diagonal_fisher(ctx.model, self.params, recipe.head, recipe.label_map, loader,
                                  self.cfg.fisher_labels, generator, ctx.device, ctx.cfg.finetune.precision)
        ctx.model.train(was_training)
        previous = ctx.store.load(fisher_file(task.index - 1)) if task.index > 0 else None
        return {fisher_file(task.index): online_fisher(previous, current, self.cfg.alpha)}
