"""The merge engine: one pass over the task vectors, yielding the merged vector after every step.

Task-major fold: the state holds one vector, so memory stays at about three task vectors whatever
the number of tasks, and all T per-step merges cost one pass (O(T), not O(T^2)).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from clmerge.errors import UserError
from clmerge.merging.methods import MergeMethod

Tensors = dict[str, torch.Tensor]


def check_finite(vector: Tensors, where: str) -> None:
    """Reject NaN/Inf entries (|NaN| >= x is false, so MagMax would drop them silently)."""
    for name, tensor in vector.items():
        if not torch.isfinite(tensor).all():
            raise UserError(f"{where} has non-finite entries in {name}; re-run the fine-tuning that wrote it")


def merge_steps(load_task: Callable[[int], Tensors], num_tasks: int,
                method: MergeMethod) -> Iterator[tuple[int, Tensors]]:
    """Yield (t, m_t) for t = 1..num_tasks, folding tau_t = load_task(t - 1) in task order."""
    if num_tasks < 1:
        raise UserError("there are no task vectors to merge; run `clmerge finetune` first")
    state: dict[str, torch.Tensor | None] = {}
    for t in range(1, num_tasks + 1):
        tau = load_task(t - 1)
        check_finite(tau, f"task vector {t}")
        if state and set(tau) != set(state):
            raise UserError(f"task vector {t} has different tensors from task vector 1; "
                            "the store mixes runs of different models")
        for name, tensor in tau.items():
            state[name] = method.update(state.get(name), tensor.float(), t)
        yield t, {name: method.finalize(value, t) for name, value in state.items()}
