"""Count correct predictions of one model on every task's test split, task-agnostic and task-aware.

One forward pass over the union of the test splits gives both protocols (SPEC.md 5): task-agnostic is
the argmax over the all-class head; task-aware is the argmax over task j's own classes of the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clmerge.evaluation.testset import TestSet, collect_test_set
from clmerge.models.heads import logits

__all__ = ["Counts", "TestSet", "collect_test_set", "count_correct"]


@dataclass(frozen=True)
class Counts:
    """Correct predictions per task under each protocol."""

    agnostic: list[int]
    aware: list[int]


@torch.inference_mode()
def count_correct(model: torch.nn.Module, head: torch.Tensor, test: TestSet, batch_size: int,
                  device: torch.device) -> Counts:
    """c[j] for one model: correct top-1 predictions on task j's test samples, both protocols."""
    model.eval()
    head = head.to(device)
    agnostic = torch.zeros(test.num_tasks, dtype=torch.int64)
    aware = torch.zeros(test.num_tasks, dtype=torch.int64)
    for start in range(0, len(test), batch_size):
        stop = start + batch_size
        scores = logits(model, head, test.batch(start, stop).to(device)).cpu()
        labels, tasks = test.labels[start:stop], test.task_ids[start:stop]
        agnostic += torch.bincount(tasks[scores.argmax(1) == labels], minlength=test.num_tasks)
        masked = scores.masked_fill(~test.task_columns[tasks], float("-inf"))
        aware += torch.bincount(tasks[masked.argmax(1) == labels], minlength=test.num_tasks)
    return Counts(agnostic.tolist(), aware.tolist())
