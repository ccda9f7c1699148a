"""The one fine-tuning loop (SPEC.md section 3): visual tower trained against a frozen zero-shot head.

Where each task starts and what a regime adds to the loop (extra loss terms, steps after each optimizer
step) is decided by training/regimes.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clmerge.config import ADAPTERS, REGIMES, REGULARIZED_REGIMES, REGULARIZERS, FinetuneConfig
from clmerge.errors import UserError
from clmerge.models.heads import embed
from clmerge.training.batches import ShuffledBatches
from clmerge.training.distributed import GlobalBatches, Shard, check_distributed
from clmerge.training.optim import Stepper, check_accumulate, make_optimizer
from clmerge.training.pam import check_pam
from clmerge.training.precision import resolve_device, resolve_precision
from clmerge.training.resume import Resumed, TaskCheckpoints
from clmerge.training.schedule import lr_at, peak_lr, warmup_length

StepCallback = Callable[[int, float, float], None]  # (step, loss, lr)
ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (features, images, targets)
AfterStep = Callable[[int, int, torch.optim.Optimizer], None]  # (step, total steps, optimizer)
FISHER_LABELS = ("argmax", "sampled", "true")  # EWC's Fisher labels (training/ewc.py)


@dataclass(frozen=True)
class TaskHooks:
    """What a regime adds to the loop of one task (training/regimes.py).

    extra_loss: a term added to the cross-entropy, from the normalized image features the training head
    scores (fp32), the input images and the targets (rows of the training head); EWC and LwF.
    after_step: called after every optimizer step (1-based step); PAM's periodic alignment.
    """

    extra_loss: Optional[ExtraLoss] = None
    after_step: Optional[AfterStep] = None


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
    if cfg.regime not in REGIMES:
        raise UserError(f"unknown finetune.regime '{cfg.regime}'; valid: {', '.join(REGIMES)}")
    if cfg.adapter not in ADAPTERS:
        raise UserError(f"unknown finetune.adapter '{cfg.adapter}'; valid: {', '.join(ADAPTERS)}")
    if cfg.regime == "pam":
        check_pam(cfg.pam)
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
    check_accumulate(cfg)
    check_distributed(cfg.distributed)
    resolve_precision(cfg.precision, resolve_device(cfg.device))
    _check_regularizer(cfg)


def _check_regularizer(cfg: FinetuneConfig) -> None:
    """Reject regularizer settings no run could use (EWC, LwF: SPEC.md 3.5-3.6)."""
    if cfg.regularizer not in REGULARIZERS:
        raise UserError(f"unknown finetune.regularizer '{cfg.regularizer}'; valid: {', '.join(REGULARIZERS)}")
    if cfg.regularizer != "none" and cfg.regime not in REGULARIZED_REGIMES:
        raise UserError(f"finetune.regularizer={cfg.regularizer} needs a sequential regime, not "
                        f"finetune.regime={cfg.regime}")
    if cfg.regularizer != "none" and cfg.adapter != "full":
        raise UserError(f"finetune.regularizer={cfg.regularizer} works on the full tower only; "
                        "use finetune.adapter=full")
    for field_name, value in (("ewc.lamb", cfg.ewc.lamb), ("lwf.lamb", cfg.lwf.lamb)):
        if value < 0:
            raise UserError(f"finetune.{field_name} must be >= 0, got {value}")
    if cfg.lwf.temperature <= 0:
        raise UserError(f"finetune.lwf.temperature must be positive, got {cfg.lwf.temperature}")
    if not 0 <= cfg.ewc.alpha < 1:
        raise UserError(f"finetune.ewc.alpha must be in [0, 1), got {cfg.ewc.alpha}")
    if cfg.ewc.fisher_labels not in FISHER_LABELS:
        raise UserError(f"unknown finetune.ewc.fisher_labels '{cfg.ewc.fisher_labels}'; "
                        f"valid: {', '.join(FISHER_LABELS)}")
    if cfg.ewc.fisher_transform not in ("eval", "train"):
        raise UserError(f"finetune.ewc.fisher_transform must be eval or train, got {cfg.ewc.fisher_transform}")


def train_task(model: torch.nn.Module, params: list[torch.nn.Parameter], recipe: TaskRecipe, dataset: Dataset,
               cfg: FinetuneConfig, seed: int, device: torch.device,
               on_step: Optional[StepCallback] = None, hooks: TaskHooks = TaskHooks(),
               shard: Shard = Shard(), checkpoints: Optional[TaskCheckpoints] = None) -> TaskStats:
    """Fine-tune `params` on `dataset` with a fresh AdamW and schedule; returns the task's statistics.

    With several processes (`shard`), this rank trains on its slice of each global batch (training/optim.py).
    With `checkpoints`, the task resumes from its latest step checkpoint and saves new ones as configured.
    """
    check_accumulate(cfg, shard.world)
    total = steps_per_task(cfg, len(dataset))
    warmup = warmup_length(total, cfg.warmup_steps, cfg.warmup_ratio)
    optimizer = make_optimizer(params, cfg, device)
    stepper = Stepper(params, optimizer, cfg, resolve_precision(cfg.precision, device), device, shard)
    resumed = checkpoints.restore(params, optimizer, total, seed) if checkpoints else Resumed()
    loader = GlobalBatches(dataset, ShuffledBatches(len(dataset), cfg.batch_size, seed, total, start=resumed.step),
                           shard, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    head, label_map = recipe.head.to(device), recipe.label_map.to(device)

    def loss_fn(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = embed(model, images)
        with torch.autocast(device.type, enabled=False):  # the x100-scaled head logits stay fp32
            loss = F.cross_entropy(features @ head.T, targets)
        if hooks.extra_loss is not None:
            loss = loss + hooks.extra_loss(features, images, targets)
        return loss

    model.train()
    step, loss_value, seen, start = resumed.step, resumed.loss, 0, time.perf_counter()
    while step < total:
        for images, labels, size in loader:
            if step >= total:
                break
            lr = lr_at(step, cfg.lr, warmup, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss_value = stepper.step(images, label_map[labels], size, loss_fn)
            if not math.isfinite(loss_value):
                raise UserError(f"the loss became {loss_value} at step {step + 1}; nothing of this step was saved "
                                "(finished tasks and step checkpoints are kept); lower finetune.lr and rerun")
            step, seen = step + 1, seen + size
            if hooks.after_step is not None:
                hooks.after_step(step, total, optimizer)
            if on_step is not None:
                on_step(step, loss_value, lr)
            if checkpoints is not None:
                checkpoints.after_step(step, total, loss_value, params, optimizer)
    seconds = time.perf_counter() - start
    return TaskStats(steps=total, warmup_steps=warmup, peak_lr=peak_lr(cfg.lr, warmup, total),
                     final_loss=loss_value, seconds=seconds, images_per_second=seen / max(seconds, 1e-9))
