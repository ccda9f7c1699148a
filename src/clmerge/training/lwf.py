"""Learning without forgetting (Li and Hoiem 2016) as SPEC.md 3.6 defines it, teacher logits without autograd.

For task t >= 2: L = CE(z_new, y) + lamb * KD, with the frozen teacher theta_{t-1} (read from the store)
and the old head W_old (class-incremental: the training heads of tasks 1..t-1 concatenated in task order;
domain-incremental: the full head):
    q = softmax(W_old f_{t-1}(x) / T),  p = softmax(W_old f_theta(x) / T),  p~ = (p + eps/C) / (1 + eps)
    KD = mean over the batch of -sum_c q_c log p~_c          (eps = 1e-5, C = old classes)
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from clmerge.models.heads import embed
from clmerge.models.tower import load_tower
from clmerge.store import task_file
from clmerge.training.finetune import TaskHooks

if TYPE_CHECKING:
    from clmerge.benchmarks import Task
    from clmerge.training.regimes import RegimeContext

Tensors = dict[str, torch.Tensor]
EPS = 1e-5


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD = mean_b -sum_c softmax(teacher/T)_c * log((softmax(student/T)_c + eps/C) / (1 + eps))."""
    q = torch.softmax(teacher.float() / temperature, dim=1)
    p = torch.softmax(student.float() / temperature, dim=1)
    smoothed = (p + EPS / p.shape[1]) / (1 + EPS)
    return -(q * smoothed.log()).sum(dim=1).mean()


def old_rows(task: Task, tasks: tuple[Task, ...], num_classes: int, restrict: bool) -> list[int]:
    """Rows of the all-class head the teacher is distilled on: the classes of the tasks before `task`,
    in task order (restrict, class-incremental), else every class."""
    if not restrict:
        return list(range(num_classes))
    return [c for earlier in tasks[: task.index] for c in earlier.classes]


class LwF:
    """The LwF term of a sequential run: distillation hooks for each task; it stores nothing."""

    def __init__(self, ctx: RegimeContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.finetune.lwf

    def _teacher(self, task: Task) -> torch.nn.Module:
        """A frozen copy of the model holding theta_{t-1} = theta_0 + tau_{t-1} from the store."""
        teacher = copy.deepcopy(self.ctx.model)
        load_tower(teacher, self.ctx.base, self.ctx.store.load(task_file(task.index - 1)))
        teacher.requires_grad_(False)
        return teacher.eval()

    def hooks(self, task: Task) -> TaskHooks:
        """Distillation from the model after the previous task (none for the first task)."""
        if task.index == 0:
            return TaskHooks()
        ctx = self.ctx
        restrict = ctx.benchmark.setting != "domain_incremental"
        rows = old_rows(task, ctx.benchmark.tasks, ctx.benchmark.num_classes, restrict)
        head = ctx.head_all[rows].to(ctx.device)
        teacher = self._teacher(task)
        lamb, temperature = self.cfg.lamb, self.cfg.temperature

        def kd(features: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                old = embed(teacher, images) @ head.T
            return lamb * distillation(features @ head.T, old, temperature)

        return TaskHooks(extra_loss=kd)

    def finish(self, task: Task) -> dict[str, Tensors]:
        """LwF keeps no state of its own across tasks (the teacher is the stored task vector)."""
        return {}
