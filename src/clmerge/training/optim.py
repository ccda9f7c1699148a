"""One optimizer step of the fine-tuning loop: AdamW's implementation, gradient accumulation over
micro-batches, mixed precision (with a gradient scaler for fp16), data-parallel gradient sums, clipping.

Every micro-batch's loss (cross-entropy plus any `TaskHooks.extra_loss` term) is weighted by its share of
the global batch, |micro| / |batch|, so the summed gradient is the gradient of the full-batch mean loss,
and a data-independent penalty (EWC) counts once per optimizer step, not once per micro-batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from clmerge.config import FinetuneConfig
from clmerge.errors import UserError
from clmerge.training.distributed import Shard, all_reduce_gradients
from clmerge.training.precision import autocast, grad_scaler

OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "plain")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, targets) -> mean loss of the micro-batch


def check_accumulate(cfg: FinetuneConfig, world: int = 1) -> None:
    """The global batch must split evenly into `accumulate` micro-batches on each of `world` processes."""
    if cfg.accumulate < 1:
        raise UserError(f"finetune.accumulate must be at least 1, got {cfg.accumulate}")
    if cfg.batch_size % (cfg.accumulate * world):
        raise UserError(f"finetune.batch_size={cfg.batch_size} does not split into finetune.accumulate="
                        f"{cfg.accumulate} micro-batches on {world} process(es); use a batch size divisible "
                        f"by {cfg.accumulate * world}")
    if cfg.optimizer_impl not in OPTIMIZER_IMPLS:
        raise UserError(f"unknown finetune.optimizer_impl '{cfg.optimizer_impl}'; valid: {', '.join(OPTIMIZER_IMPLS)}")


def make_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the recipe's hyper-parameters; `auto` = fused kernels (measured fastest, docs/performance.md)."""
    impl = "fused" if cfg.optimizer_impl == "auto" else cfg.optimizer_impl
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, **flags)


class Stepper:
    """Runs optimizer steps of one task: micro-batches, precision, gradient sum over ranks, clip, update."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, cfg: FinetuneConfig,
                 precision: str, device: torch.device, shard: Shard) -> None:
        self.params, self.optimizer, self.cfg = params, optimizer, cfg
        self.precision, self.device, self.shard = precision, device, shard
        self.scaler = grad_scaler(precision, device)

    def step(self, images: torch.Tensor, targets: torch.Tensor, global_size: int, loss_fn: LossFn) -> float:
        """One optimizer step on this rank's slice of a global batch of `global_size`; returns the batch loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro_images, micro_targets in zip(images.tensor_split(self.cfg.accumulate),
                                               targets.tensor_split(self.cfg.accumulate)):
            if len(micro_targets) == 0:
                continue
            with autocast(self.precision, self.device):
                loss = loss_fn(micro_images, micro_targets)
            if len(micro_targets) != global_size:
                loss = loss * (len(micro_targets) / global_size)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach().float()
        total = all_reduce_gradients(self.params, total, self.shard)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total.item()
