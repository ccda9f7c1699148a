"""Count correct predictions of one model on every task's test split, task-agnostic and task-aware.

One forward pass over the union of the test splits gives both protocols (SPEC.md 5): task-agnostic is
the argmax over the all-class head; task-aware is the argmax over task j's own classes of the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from clmerge.models.heads import logits


@dataclass(frozen=True)
class TestSet:
    """The test splits of all tasks, concatenated, with each sample's task index and each task's columns."""

    images: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    task_columns: torch.Tensor  # [T, C] bool: the classes of each task

    @property
    def num_tasks(self) -> int:
        return self.task_columns.shape[0]

    def sizes(self) -> list[int]:
        """n_j: number of test samples of each task."""
        return torch.bincount(self.task_ids, minlength=self.num_tasks).tolist()


def collect_test_set(splits: list[Dataset], task_classes: list[tuple[int, ...]], num_classes: int) -> TestSet:
    """Materialise every task's test split once, so that all T+1 models reuse the decoded images."""
    images, labels, task_ids = [], [], []
    for index, split in enumerate(splits):
        for batch_images, batch_labels in DataLoader(split, batch_size=512):
            images.append(batch_images)
            labels.append(batch_labels)
            task_ids.append(torch.full_like(batch_labels, index))
    columns = torch.zeros(len(task_classes), num_classes, dtype=torch.bool)
    for index, classes in enumerate(task_classes):
        columns[index, list(classes)] = True
    return TestSet(torch.cat(images), torch.cat(labels), torch.cat(task_ids), columns)


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
    for start in range(0, len(test.labels), batch_size):
        stop = start + batch_size
        scores = logits(model, head, test.images[start:stop].to(device)).cpu()
        labels, tasks = test.labels[start:stop], test.task_ids[start:stop]
        agnostic += torch.bincount(tasks[scores.argmax(1) == labels], minlength=test.num_tasks)
        masked = scores.masked_fill(~test.task_columns[tasks], float("-inf"))
        aware += torch.bincount(tasks[masked.argmax(1) == labels], minlength=test.num_tasks)
    return Counts(agnostic.tolist(), aware.tolist())
