"""Group runs by benchmark, and each method (lambda, config variant) over seeds: mean and std per metric.

Runs whose benchmark configs differ are different benchmarks and are never averaged together. Within a
benchmark, a row is (method, its lambda, the variant: the config keys that differ between the runs,
seed and bookkeeping keys left out), and its statistics run over the distinct seeds. Metrics are computed
again from the stored counts (SPEC.md 5), so older results.json files get the newer metrics too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clmerge.config import REGULARIZERS
from clmerge.evaluation.metrics import summary, zero_shot_retention
from clmerge.reporting.collect import Run

METRICS = ("final_accuracy", "final_accuracy_weighted", "average_incremental_accuracy", "own_task_accuracy",
           "forgetting", "backward_transfer", "forward_transfer", "zscl_transfer", "zscl_average",
           "future_zero_shot_change_mean", "zero_shot_retention_final")
PROTOCOLS = {"agnostic": "correct", "aware": "correct_task_aware"}  # protocol -> the counts of results.json
# Config keys that never make a different experiment (or are the row's lambda, or the group itself, or are
# spelled out by the method's name: seq_ft, ind_ft, joint, ewc, lwf, ewc+magmax, ...).
_NOT_A_VARIANT = ("seed", "threads", "paths.", "eval.", "merge.alpha", "merge.method", "merge.export",
                  "merge.save_steps", "finetune.num_workers", "finetune.device", "benchmark.", "finetune.regime",
                  "finetune.regularizer")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for fewer than two values) over seeds."""

    mean: Optional[float]
    std: Optional[float]
    n: int

    @staticmethod
    def of(values: list[Optional[float]]) -> Stat:
        present = [v for v in values if v is not None]
        if not present:
            return Stat(None, None, 0)
        mean = sum(present) / len(present)
        std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1)) if len(present) > 1 else None
        return Stat(mean, std, len(present))


@dataclass(frozen=True)
class RowKey:
    method: str
    alpha: float
    variant: str  # "" when every run of the benchmark shares the config

    @property
    def label(self) -> str:
        return f"{self.method} λ={self.alpha:g}" + (f" [{self.variant}]" if self.variant else "")


@dataclass(frozen=True)
class MethodRun:
    """One method in one run: its seed, file and metrics under both protocols."""

    seed: int
    path: Path
    metrics: dict[str, dict[str, Any]]  # protocol -> summary()
    accuracy: dict[str, list[list[float]]]  # protocol -> A[t][j]


@dataclass
class Group:
    """The runs of one benchmark (one benchmark config)."""

    label: str
    benchmark: dict[str, Any]
    task_names: list[str]
    rows: dict[RowKey, list[MethodRun]] = field(default_factory=dict)

    def stat(self, key: RowKey, metric: str, protocol: str = "agnostic") -> Stat:
        return Stat.of([run.metrics[protocol][metric] for run in self.rows[key]])


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(node)}


def _used(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the sub-configs of regularizers the run does not use (finetune.ewc, finetune.lwf)."""
    finetune = config.get("finetune")
    if not isinstance(finetune, dict):
        return config
    unused = [name for name in REGULARIZERS if name != finetune.get("regularizer")]
    return {**config, "finetune": {k: v for k, v in finetune.items() if k not in unused}}


def _variants(runs: list[Run]) -> list[str]:
    """Per run: the config keys (other than seed and bookkeeping) whose values differ between `runs`."""
    flat = [_flatten(_used(run.results.get("config", {}))) for run in runs]
    keys = sorted({k for f in flat for k in f if not k.startswith(_NOT_A_VARIANT)})
    varying = [k for k in keys if len({f.get(k) for f in flat}) > 1]
    return [", ".join(f"{k}={json.loads(f[k]) if k in f else '∅'}" for k in varying) for f in flat]


def _zero_shot(results: dict[str, Any], counts: str) -> Optional[list[int]]:
    """theta_0's counts per task: the stored row, else the zero_shot method's first row, else None."""
    if "zero_shot_row" in results:
        return results["zero_shot_row"][counts]
    zero = results["methods"].get("zero_shot")
    return zero[counts][0] if zero else None


def _method_run(results: dict[str, Any], path: Path, entry: dict[str, Any]) -> MethodRun:
    sizes = results["test_sizes"]
    retention = zero_shot_retention(entry.get("control_correct", {}),
                                    results.get("zero_shot_row", {}).get("control_correct", {}),
                                    results.get("control_sizes", {}))
    metrics, accuracy = {}, {}
    for protocol, counts in PROTOCOLS.items():
        metrics[protocol] = {**summary(entry[counts], sizes, _zero_shot(results, counts)), **retention}
        accuracy[protocol] = [[c / n for c, n in zip(row, sizes)] for row in entry[counts]]
    return MethodRun(results.get("seed", 0), path, metrics, accuracy)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by benchmark config, rows in order of first appearance, one entry per seed."""
    by_benchmark: dict[str, list[Run]] = {}
    for run in runs:
        config = dict(run.results.get("config", {}).get("benchmark") or run.results["benchmark"])
        if not config.get("val_fraction", 1):  # as in the store keys: results from before the field group alike
            del config["val_fraction"]
        by_benchmark.setdefault(json.dumps(config, sort_keys=True), []).append(run)
    labels = _labels([json.loads(key) for key in by_benchmark])
    groups = []
    for (key, members), label in zip(by_benchmark.items(), labels):
        tasks = [task["name"] for task in members[0].results["benchmark"]["tasks"]]
        group = Group(label, json.loads(key), tasks)
        for run, variant in zip(members, _variants(members)):
            for method, entry in run.results["methods"].items():
                rows = group.rows.setdefault(RowKey(method, float(entry["alpha"]), variant), [])
                if all(existing.seed != run.results.get("seed", 0) for existing in rows):
                    rows.append(_method_run(run.results, run.path, entry))
        groups.append(group)
    return groups


def _labels(configs: list[dict[str, Any]]) -> list[str]:
    """A benchmark's name, plus the config keys that tell apart benchmarks of the same name."""
    names = [str(config.get("name", "?")) for config in configs]
    labels = []
    for name, config in zip(names, configs):
        twins = [c for n, c in zip(names, configs) if n == name]
        if len(twins) == 1:
            labels.append(name)
            continue
        flat = [_flatten(c) for c in twins]
        differing = sorted(k for k in _flatten(config) if len({f.get(k) for f in flat}) > 1)
        labels.append(f"{name} ({', '.join(f'{k}={json.loads(_flatten(config)[k])}' for k in differing)})")
    return labels
