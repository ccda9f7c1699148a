"""Class-incremental sequences: the label space cut into disjoint groups of classes."""

from __future__ import annotations

from typing import Optional, Sequence

from clmerge.benchmarks.types import Task
from clmerge.errors import UserError


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


def class_incremental_tasks(order: Sequence[int], num_tasks: int) -> tuple[Task, ...]:
    """The tasks of a class-incremental sequence."""
    return tuple(Task(index=i, name=f"task{i + 1}", classes=group)
                 for i, group in enumerate(split_classes(order, num_tasks)))
