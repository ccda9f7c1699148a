"""Numeric precision of fine-tuning: fp32, or bf16 autocast with fp32 master weights."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from clmerge.errors import UserError

PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """`auto` = the first CUDA device when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"finetune.device={name} but no CUDA device is visible; use finetune.device=cpu")
    return torch.device(name)


def autocast(precision: str, device: torch.device) -> ContextManager[object]:
    """The autocast context of `precision` on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise UserError(f"unknown finetune.precision '{precision}'; valid: {', '.join(PRECISIONS)}")
