"""Task and benchmark types: plain, frozen data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Task:
    """One step of a sequence: the classes it trains on and, for domain-incremental, its domain."""

    index: int  # 0-based position in the sequence
    name: str
    classes: tuple[int, ...]  # global class indices, sorted
    domain: Optional[str] = None


@dataclass(frozen=True)
class Benchmark:
    """A sequence of tasks over one label space, with the class names and prompt templates of its head."""

    name: str
    setting: str  # class_incremental | domain_incremental
    dataset: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    tasks: tuple[Task, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def to_json(self) -> dict[str, Any]:
        """The benchmark as recorded in manifests and results."""
        return {
            "name": self.name,
            "setting": self.setting,
            "dataset": self.dataset,
            "classnames": list(self.classnames),
            "tasks": [{**asdict(task), "classes": list(task.classes)} for task in self.tasks],
        }
