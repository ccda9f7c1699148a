"""Numeric precision of fine-tuning: fp32, bf16 autocast, or fp16 autocast with a gradient scaler.

Master weights, optimizer state and task vectors stay fp32 in every mode; only the forward and backward
matrix products run in the reduced type. `auto` picks bf16 where the hardware runs it natively, fp16 on
CUDA GPUs without bf16, fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import ContextManager, Optional

import torch

from clmerge.config import Config
from clmerge.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """`auto` = the first CUDA device when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"finetune.device={name} but no CUDA device is visible; use finetune.device=cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matrix products natively (CPU: AVX512-BF16 or AMX; CUDA: Ampere or newer).

    Without them, CPU bf16 products are emulated and far slower than fp32. Tests monkeypatch this.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses on `device`: `auto` resolved, an unsupported request rejected in one line."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown finetune.precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and not native_bf16(device):
        where = "this GPU (bf16 needs compute capability 8.0 or newer)" if device.type == "cuda" else \
            "this CPU (bf16 needs AVX512-BF16 or AMX; without them it is emulated and slower than fp32)"
        alternative = "fp16" if device.type == "cuda" else "fp32"
        raise UserError(f"finetune.precision=bf16 is not supported on {where}; "
                        f"use finetune.precision={alternative} or finetune.precision=auto")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"finetune.precision=fp16 needs a CUDA GPU (it trains with a gradient scaler) and the "
                        f"device is {device.type}; use finetune.precision=auto (bf16 where supported, else fp32)")
    return precision


def with_precision(cfg: Config, check: bool) -> Config:
    """`cfg` with finetune.precision resolved on this machine: the store key and results.json record the
    precision that ran. `check=False` (merge, eval) only resolves `auto` and trusts explicit values."""
    precision = cfg.finetune.precision
    if check or precision == "auto":
        precision = resolve_precision(precision, resolve_device(cfg.finetune.device))
    return replace(cfg, finetune=replace(cfg.finetune, precision=precision))


def autocast(precision: str, device: torch.device) -> ContextManager[object]:
    """The autocast context of a resolved `precision` on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
