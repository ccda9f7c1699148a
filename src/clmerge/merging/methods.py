"""Merge methods as left folds over task vectors, tensor by tensor (SPEC.md sections 1.1 and 2).

Each method is a pair of pure functions: `update(state, tau_t, t)` folds task t (1-based) into the
state (state is None before the first task), and `finalize(state, t)` gives the merged vector m after
step t. The deployed model is theta_0 + lambda * m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from clmerge.errors import UserError

Update = Callable[[Optional[torch.Tensor], torch.Tensor, int], torch.Tensor]
Finalize = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its fold, its default lambda and the paper it comes from."""

    name: str
    update: Update
    finalize: Finalize
    default_alpha: float
    reference: str


def magmax_update(state: Optional[torch.Tensor], tau: torch.Tensor, t: int) -> torch.Tensor:
    """MagMax (Marczak et al., ECCV 2024): keep, per entry, the signed value of largest magnitude.

    m_1 = tau_1;  m_t = where(|tau_t| >= |m_{t-1}|, tau_t, m_{t-1})  -- ">=", so ties go to the latest task.
    """
    if state is None:
        return tau.clone()
    return torch.where(tau.abs() >= state.abs(), tau, state)


def identity_finalize(state: torch.Tensor, t: int) -> torch.Tensor:
    """The state is the merged vector."""
    return state


def sum_update(state: Optional[torch.Tensor], tau: torch.Tensor, t: int) -> torch.Tensor:
    """Running sum S_t = S_{t-1} + tau_t."""
    return tau.clone() if state is None else state + tau


def mean_finalize(state: torch.Tensor, t: int) -> torch.Tensor:
    """Weight averaging: m = (1/t) * S_t, i.e. the mean of the fine-tuned weights (the reference's order)."""
    return state * (1.0 / t)


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod("magmax", magmax_update, identity_finalize, 0.5, "Marczak et al., ECCV 2024, arXiv 2407.06322"),
        MergeMethod("average", sum_update, mean_finalize, 1.0, "model soups / weight averaging (Wortsman et al. 2022)"),
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`, or a one-line error listing the valid names."""
    if name not in METHODS:
        raise UserError(f"unknown merge method '{name}'; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_alpha(method: MergeMethod, alpha: Optional[float]) -> float:
    """The lambda to deploy with: the configured one, or the method's default."""
    return method.default_alpha if alpha is None else float(alpha)
