"""Domain-incremental sequences: the same label space seen in one domain after another."""

from __future__ import annotations

from typing import Sequence

from clmerge.benchmarks.types import Task
from clmerge.errors import UserError


def domain_incremental_tasks(domains: Sequence[str], known: Sequence[str], num_classes: int,
                             num_tasks: int) -> tuple[Task, ...]:
    """One task per domain, in the given order, each over every class."""
    if not domains:
        raise UserError("benchmark.domains is empty; list the domains in task order")
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise UserError(f"unknown domain(s) {unknown}; valid domains: {', '.join(known)}")
    if len(set(domains)) != len(domains):
        raise UserError(f"benchmark.domains repeats a domain: {list(domains)}; list each domain once")
    if num_tasks != len(domains):
        raise UserError(f"benchmark.num_tasks={num_tasks} but {len(domains)} domains are listed; "
                        f"set benchmark.num_tasks={len(domains)}")
    classes = tuple(range(num_classes))
    return tuple(Task(index=i, name=d, classes=classes, domain=d) for i, d in enumerate(domains))
