"""The one fine-tuning loop (SPEC.md section 3): visual tower trained against a frozen zero-shot head.

Sequential regime: task t starts from theta_0 + tau_{t-1}, read back from the store, so a resumed run and
an uninterrupted one compute exactly the same thing. Independent regime: every task starts from theta_0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clmerge.config import FinetuneConfig
from clmerge.errors import UserError
from clmerge.models.heads import logits
from clmerge.training.batches import ShuffledBatches
from clmerge.training.precision import autocast
from clmerge.training.resume import Resumed, TaskCheckpoints
from clmerge.training.schedule import lr_at, peak_lr, warmup_length

StepCallback = Callable[[int, float, float], None]  # (step, loss, lr)


@dataclass(frozen=True)
class TaskRecipe:
    """What one task trains on: its head rows and the map from global label to head row."""

    head: torch.Tensor  # [K, D] rows of the frozen zero-shot head
    label_map: torch.Tensor  # [C] global label -> row index in `head` (-1 for classes not in it)


@dataclass(frozen=True)
class TaskStats:
    """Summary of one task's training, recorded in the manifest."""

    steps: int
    warmup_steps: int
    peak_lr: float
    final_loss: float
    seconds: float
    images_per_second: float


def task_recipe(head_all: torch.Tensor, classes: tuple[int, ...], restrict: bool) -> TaskRecipe:
    """Training head of a task: only its classes (class-incremental, SPEC 3.3) or the full head."""
    num_classes = head_all.shape[0]
    rows = list(classes) if restrict else list(range(num_classes))
    label_map = torch.full((num_classes,), -1, dtype=torch.int64)
    label_map[torch.tensor(rows)] = torch.arange(len(rows))
    return TaskRecipe(head=head_all[rows], label_map=label_map)


def steps_per_task(cfg: FinetuneConfig, num_examples: int) -> int:
    """Optimizer steps of a task: `steps` when set, else epochs * ceil(N / batch)."""
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * math.ceil(num_examples / cfg.batch_size)


def effective_recipe(cfg: FinetuneConfig, task_epochs: Optional[int]) -> FinetuneConfig:
    """The recipe of one task: `finetune.epochs`, or the benchmark's epochs for the task when that is null."""
    if cfg.steps is not None or cfg.epochs is not None:
        return cfg
    if task_epochs is None:
        raise UserError("finetune.epochs is null and the benchmark sets no epochs for this task; "
                        "set finetune.epochs=N (or benchmark.epochs=N)")
    return replace(cfg, epochs=task_epochs)


def check_recipe(cfg: FinetuneConfig) -> None:
    """Reject recipe values no run could use."""
    if cfg.log not in ("none", "csv"):
        raise UserError(f"finetune.log must be none or csv, got {cfg.log}")
    if cfg.batch_size < 1:
        raise UserError(f"finetune.batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError(f"finetune.steps must be at least 1 (or null to use epochs), got {cfg.steps}")
    if cfg.steps is None and cfg.epochs is not None and cfg.epochs < 1:
        raise UserError(f"finetune.epochs must be at least 1, got {cfg.epochs}")
    if cfg.checkpoint_every < 0:
        raise UserError(f"finetune.checkpoint_every must be 0 (off) or a number of steps, got {cfg.checkpoint_every}")
    if cfg.lr <= 0:
        raise UserError(f"finetune.lr must be positive, got {cfg.lr}")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio <= 1:
        raise UserError(f"finetune.warmup_ratio must be in [0, 1] (or null), got {cfg.warmup_ratio}")


def train_task(model: torch.nn.Module, params: list[torch.nn.Parameter], recipe: TaskRecipe, dataset: Dataset,
               cfg: FinetuneConfig, seed: int, device: torch.device,
               on_step: Optional[StepCallback] = None, checkpoints: Optional[TaskCheckpoints] = None) -> TaskStats:
    """Fine-tune `params` on `dataset` with a fresh AdamW and schedule; returns the task's statistics.

    With `checkpoints`, the task resumes from its latest step checkpoint and saves new ones as configured.
    """
    total = steps_per_task(cfg, len(dataset))
    warmup = warmup_length(total, cfg.warmup_steps, cfg.warmup_ratio)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)
    resumed = checkpoints.restore(params, optimizer, total, seed) if checkpoints else Resumed()
    batches = ShuffledBatches(len(dataset), cfg.batch_size, seed, total, start=resumed.step)
    loader = DataLoader(dataset, batch_sampler=batches, generator=torch.Generator().manual_seed(seed),
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    head, label_map = recipe.head.to(device), recipe.label_map.to(device)
    model.train()
    step, loss_value, seen, start = resumed.step, resumed.loss, 0, time.perf_counter()
    while step < total:
        for images, labels in loader:
            if step >= total:
                break
            lr = lr_at(step, cfg.lr, warmup, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.precision, device):
                loss = F.cross_entropy(logits(model, head, images), label_map[labels])
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise UserError(f"the loss became {loss_value} at step {step + 1}; nothing of this step was saved "
                                "(finished tasks and step checkpoints are kept); lower finetune.lr and rerun")
            step, seen = step + 1, seen + len(labels)
            if on_step is not None:
                on_step(step, loss_value, lr)
            if checkpoints is not None:
                checkpoints.after_step(step, total, loss_value, params, optimizer)
    seconds = time.perf_counter() - start
    return TaskStats(steps=total, warmup_steps=warmup, peak_lr=peak_lr(cfg.lr, warmup, total),
                     final_loss=loss_value, seconds=seconds, images_per_second=seen / max(seconds, 1e-9))
