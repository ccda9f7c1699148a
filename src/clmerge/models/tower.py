"""The trained tower: which parameters fine-tuning updates, and task-vector arithmetic on them."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]
TRAINED_PREFIX = "visual."


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every floating-point parameter of the visual tower, by full state-dict name (SPEC.md 3.1)."""
    return {name: p for name, p in model.named_parameters()
            if name.startswith(TRAINED_PREFIX) and p.dtype.is_floating_point}


def freeze_all_but_tower(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze the text side and logit_scale; return the trained parameters in a stable order."""
    trained = trained_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    return list(trained.values())


def snapshot(model: torch.nn.Module) -> Tensors:
    """A detached fp32 CPU copy of the trained tower."""
    return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in trained_parameters(model).items()}


def task_vector(model: torch.nn.Module, base: Tensors) -> Tensors:
    """tau = theta - theta_0 over the trained tower."""
    return {name: p.detach().to("cpu", torch.float32) - base[name] for name, p in trained_parameters(model).items()}


@torch.no_grad()
def load_tower(model: torch.nn.Module, base: Tensors, vector: Tensors | None = None, scale: float = 1.0) -> None:
    """Set the trained tower to theta_0 + scale * vector (theta_0 when vector is None)."""
    params = trained_parameters(model)
    missing = set(params) - set(base)
    if missing:
        raise ValueError(f"base weights lack {len(missing)} tower tensors, e.g. {sorted(missing)[0]}")
    for name, p in params.items():
        value = base[name] if vector is None else base[name] + scale * vector[name]
        p.copy_(value.to(p.device, p.dtype))
