"""Class-incremental sequences: the label space cut into disjoint groups of classes."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from clmerge.benchmarks.types import Task
from clmerge.errors import UserError

ORDER_CHOICES = "reference, seeded, natural (or null) or an explicit list"


def split_classes(order: Sequence[int], num_tasks: int) -> list[tuple[int, ...]]:
    """Cut `order` into `num_tasks` groups: task i gets sorted(order[n*i//k : n*(i+1)//k]).

    Integer arithmetic (SPEC.md 4.1), so every class lands in exactly one task for every (n, k).
    """
    n = len(order)
    if num_tasks < 1:
        raise UserError(f"benchmark.num_tasks must be at least 1, got {num_tasks}")
    if num_tasks > n:
        raise UserError(f"benchmark.num_tasks={num_tasks} exceeds the {n} classes; use at most {n} tasks")
    return [tuple(sorted(order[n * i // num_tasks : n * (i + 1) // num_tasks])) for i in range(num_tasks)]


def check_class_order(order: Optional[Sequence[int]], num_classes: int) -> list[int]:
    """The class order to use: `order` validated as a permutation of 0..C-1, or the natural order."""
    if order is None:
        return list(range(num_classes))
    if sorted(order) != list(range(num_classes)):
        raise UserError(f"benchmark.class_order must be a permutation of 0..{num_classes - 1} "
                        f"({len(order)} entries given); fix the list or set it to null")
    return list(order)


def resolve_class_order(value: Any, num_classes: int, reference: Optional[Sequence[int]], seed: int) -> list[int]:
    """The class order `benchmark.class_order` asks for.

    reference: the dataset's reference order (SPEC.md 4.1; natural where it has none); seeded: a
    permutation drawn from `seed`; natural or null: 0..C-1; a list: that permutation.
    """
    if value is None or value == "natural":
        return list(range(num_classes))
    if value == "reference":
        if reference is not None and len(reference) != num_classes:
            raise UserError(f"the reference class order has {len(reference)} classes, the data {num_classes}; "
                            "set benchmark.class_order=natural or seeded")
        return check_class_order(reference, num_classes)
    if value == "seeded":
        return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    if isinstance(value, str):
        raise UserError(f"unknown benchmark.class_order '{value}'; use {ORDER_CHOICES}")
    return check_class_order(list(value), num_classes)


def class_incremental_tasks(order: Sequence[int], num_tasks: int) -> tuple[Task, ...]:
    """The tasks of a class-incremental sequence."""
    return tuple(Task(index=i, name=f"task{i + 1}", classes=group)
                 for i, group in enumerate(split_classes(order, num_tasks)))
