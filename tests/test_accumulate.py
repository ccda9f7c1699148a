"""Gradient accumulation: micro-batches weighted by their share of the batch give the full-batch step,
the last (smaller) batch of an epoch included, and an extra loss term counts once per optimizer step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from clmerge.config import FinetuneConfig, ModelConfig
from clmerge.models.loading import load_model
from clmerge.models.tower import freeze_all_but_tower, snapshot, task_vector
from clmerge.training.distributed import Shard
from clmerge.training.finetune import task_recipe, train_task
from clmerge.training.optim import Stepper

# 40 images: batches of 32 and 8 per epoch, so 3 steps include a short last batch
CFG = FinetuneConfig(lr=1e-3, weight_decay=0.1, batch_size=32, steps=3, warmup_steps=1, optimizer_impl="plain")


def _step_change(accumulate: int, batch: int, penalty: float, precision: str = "fp32") -> list[torch.Tensor]:
    """-(gradient) of one Stepper step (plain SGD, lr 1) of a small MLP on `batch` fixed samples, with an
    EWC-like data-independent term penalty * sum ||p||^2 added to every micro-batch's loss."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    x, y = torch.randn(batch, 12, generator=generator), torch.randint(4, (batch,), generator=generator)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    cfg = replace(CFG, batch_size=32, accumulate=accumulate, grad_clip=0.0)
    stepper = Stepper(params, torch.optim.SGD(params, lr=1.0), cfg, precision, torch.device("cpu"), Shard())

    def loss_fn(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), targets) + penalty * sum(p.pow(2).sum() for p in params)

    stepper.step(x, y, batch, loss_fn)
    return [p.detach() - b for p, b in zip(params, before)]


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return (torch.cat([(u - v).reshape(-1) for u, v in zip(a, b)]).norm()
            / torch.cat([u.reshape(-1) for u in a]).norm()).item()


@pytest.mark.parametrize("batch", [32, 8])  # a full batch, and an epoch's short last batch (micro-batches of 2)
def test_accumulated_gradient_equals_the_full_batch_gradient(batch: int) -> None:
    assert _relative(_step_change(1, batch, 0.0), _step_change(4, batch, 0.0)) < 1e-6


def test_an_extra_loss_term_counts_once_per_step_not_once_per_micro_batch() -> None:
    full = _step_change(1, 32, 1e-2)
    assert _relative(full, _step_change(1, 32, 0.0)) > 1e-2  # the penalty matters
    assert _relative(full, _step_change(4, 32, 1e-2)) < 1e-6
    assert _relative(full, _step_change(1, 32, 4e-2)) > 1e-2  # what counting it 4 times would give


def test_fp16_with_the_gradient_scaler_takes_the_fp32_step() -> None:
    """The scaler's path (scaled backward, unscale before clipping, step, update) on CPU autocast fp16."""
    assert _relative(_step_change(4, 32, 0.0), _step_change(4, 32, 0.0, "fp16")) < 1e-2


def _task_vector(cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    """Task vector of 3 AdamW steps of the tiny CLIP on 40 fixed random images (train_task end to end)."""
    loaded = load_model(ModelConfig(pretrained="none"), "cpu", init_seed=0)
    params = freeze_all_but_tower(loaded.model)
    base = snapshot(loaded.model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(40, 3, 32, 32, generator=generator)
    labels = torch.randint(4, (40,), generator=generator)
    head = F.normalize(torch.randn(4, 64, generator=generator), dim=-1) * 100
    train_task(loaded.model, params, task_recipe(head, list(range(4)), True), TensorDataset(images, labels),
               cfg, seed=2, device=torch.device("cpu"))
    return task_vector(loaded.model, base)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.usefixtures("one_torch_thread")
def test_training_with_4x8_micro_batches_ends_where_batches_of_32_end() -> None:
    """Tolerance 1e-4 = 3% of the 3 steps' total lr: AdamW divides each gradient entry by its own running
    scale, so rounding differences of the summation order grow to ~2e-5 on entries with tiny gradients."""
    full = _task_vector(CFG)
    assert max(v.abs().max().item() for v in full.values()) > 1e-3  # the steps moved the weights
    assert _max_diff(full, _task_vector(replace(CFG, accumulate=4))) < 1e-4
    assert _max_diff(full, _task_vector(replace(CFG, batch_size=8))) > 1e-3  # a real batch of 8 differs
