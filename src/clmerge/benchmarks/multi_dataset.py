"""The multi-dataset setting: every task is a whole dataset with its own classes, head and epochs.

The benchmark's label space is the concatenation of the datasets' label spaces in task order; task t's
classes are its dataset's block, so training restricts the head to that block exactly as the
class-incremental setting does, and evaluation scores each task with its own block (SPEC.md 4.3, 5).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from clmerge.benchmarks.types import HeadPart, Task
from clmerge.data.registry import DatasetInfo
from clmerge.errors import UserError


def multi_dataset_tasks(datasets: Sequence[str], epochs: Mapping[str, int], num_tasks: int,
                        info: Callable[[str], DatasetInfo]) -> tuple[tuple[Task, ...], tuple[HeadPart, ...]]:
    """One task per dataset, in order, with consecutive label blocks; and the head part of each."""
    if not datasets:
        raise UserError("benchmark.datasets is empty; list the datasets in task order")
    if len(set(datasets)) != len(datasets):
        raise UserError(f"benchmark.datasets repeats a dataset: {list(datasets)}; list each dataset once")
    if num_tasks != len(datasets):
        raise UserError(f"benchmark.num_tasks={num_tasks} but {len(datasets)} datasets are listed; "
                        f"set benchmark.num_tasks={len(datasets)}")
    tasks, parts, offset = [], [], 0
    for index, name in enumerate(datasets):
        data = info(name)
        classes = tuple(range(offset, offset + data.num_classes))
        tasks.append(Task(index=index, name=name, classes=classes, dataset=name, label_offset=offset,
                          epochs=epochs.get(name)))
        parts.append(HeadPart(name, data.classnames, data.templates))
        offset += data.num_classes
    return tuple(tasks), tuple(parts)
