"""Task and benchmark types: plain, frozen data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Task:
    """One step of a sequence: the classes it trains on and, for domain-incremental, its domain.

    In the multi-dataset setting a task is a whole dataset: its classes are the block of the benchmark's
    label space that starts at `label_offset`, and `epochs` is that dataset's budget.
    """

    index: int  # 0-based position in the sequence
    name: str
    classes: tuple[int, ...]  # global class indices, sorted
    domain: Optional[str] = None
    dataset: Optional[str] = None  # multi-dataset: the dataset of this task
    label_offset: int = 0  # global label = label_offset + the dataset's own label
    epochs: Optional[int] = None  # the benchmark's epochs for this task (used when finetune.epochs is null)


@dataclass(frozen=True)
class HeadPart:
    """A block of the label space whose zero-shot head rows share one template set."""

    dataset: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Benchmark:
    """A sequence of tasks over one label space, with the class names and prompt templates of its head.

    `classnames` is empty when the benchmark was built without its data (only task structure needed).
    """

    name: str
    setting: str  # class_incremental | domain_incremental | multi_dataset
    dataset: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    tasks: tuple[Task, ...]
    num_classes: int
    class_order: tuple[int, ...] = ()  # class-incremental: the order the tasks were cut from
    parts: tuple[HeadPart, ...] = ()  # multi-dataset: one per dataset, in label order

    @property
    def own_heads(self) -> bool:
        """True when every task is evaluated with its own head only (the multi-dataset setting)."""
        return self.setting == "multi_dataset"

    def head_parts(self) -> tuple[HeadPart, ...]:
        """The blocks of the all-class head, in label order."""
        return self.parts or (HeadPart(self.dataset, self.classnames, self.templates),)

    def to_json(self) -> dict[str, Any]:
        """The benchmark as recorded in manifests and results."""
        record: dict[str, Any] = {
            "name": self.name,
            "setting": self.setting,
            "dataset": self.dataset,
            "classnames": list(self.classnames),
            "tasks": [{**asdict(task), "classes": list(task.classes)} for task in self.tasks],
        }
        if self.class_order:
            record["class_order"] = list(self.class_order)
        return record
