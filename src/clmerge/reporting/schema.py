"""The structure of the results.json and merge.json files that `clmerge report` reads.

results.json is written by clmerge.report.results_document: for every method, the counts c[t][j] of correct
predictions after step t on task j (T x T, T = the benchmark's tasks) under both protocols, and the optional
zero-shot row and control-set counts the transfer and retention metrics need. merge.json is written by
clmerge.pipeline.merge; its merge.alpha=auto curves are plotted. A check raises Invalid with a phrase naming
the field and what is wrong with it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

RESULTS_SCHEMA_VERSION = 1  # written by clmerge.report (here, so the report reads it without torch)
COUNTS = ("correct", "correct_task_aware")  # the count matrices of a method (task-agnostic, task-aware)
_KINDS = {dict: "an object", list: "a list", str: "a string"}


class Invalid(ValueError):
    """What is wrong with a document: a phrase naming the field ("methods.magmax.alpha is missing, ...")."""


def _show(value: Any) -> str:
    return "missing" if value is None else json.dumps(value)[:40]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(document: dict[str, Any], key: str, kind: type, where: str = "") -> Optional[Any]:
    """document[key], which must be a `kind` when present; None when absent."""
    value = document.get(key)
    if value is not None and not isinstance(value, kind):
        raise Invalid(f"{where}{key} is {_show(value)}, expected {_KINDS[kind]}")
    return value


def _required(document: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    value = _optional(document, key, kind, where)
    if value is None:
        raise Invalid(f"{where}{key} is missing, expected {_KINDS[kind]}")
    return value


def _length(value: Any, unit: str) -> str:
    """'has 4 rows' of a list, else what the value is."""
    if not isinstance(value, list):
        return f"is {_show(value)}"
    return f"has {len(value)} {unit}{'' if len(value) == 1 else 's'}"


def _count(value: Any, name: str, limit: int) -> None:
    if not _is_int(value) or not 0 <= value <= limit:
        raise Invalid(f"{name} is {_show(value)}, expected a count of correct predictions from 0 to {limit}")


def _counts(row: Any, name: str, limits: list[int]) -> None:
    """One count per task, each from 0 to its limit (the task's test images)."""
    if not isinstance(row, list) or len(row) != len(limits):
        raise Invalid(f"{name} {_length(row, 'value')}, expected {len(limits)} (one per task)")
    for j, (count, limit) in enumerate(zip(row, limits)):
        _count(count, f"{name}[{j}]", limit)


def _matrix(matrix: Any, name: str, sizes: list[int]) -> None:
    """T rows (one per step) of T counts."""
    if not isinstance(matrix, list) or len(matrix) != len(sizes):
        raise Invalid(f"{name} {_length(matrix, 'row')}, expected {len(sizes)} (one per task)")
    for t, row in enumerate(matrix):
        _counts(row, f"{name}[{t}]", sizes)


def _test_sizes(document: dict[str, Any]) -> list[int]:
    """The test images of each task of the benchmark."""
    tasks = _required(_required(document, "benchmark", dict), "tasks", list, "benchmark.")
    if not tasks:
        raise Invalid("benchmark.tasks is empty, expected the benchmark's tasks")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("name"), str):
            raise Invalid(f"benchmark.tasks[{i}] has no name")
    sizes = document["test_sizes"]
    if not isinstance(sizes, list) or len(sizes) != len(tasks):
        raise Invalid(f"test_sizes {_length(sizes, 'value')}, expected {len(tasks)} (one per task)")
    if not all(_is_int(n) and n > 0 for n in sizes):
        raise Invalid(f"test_sizes is {_show(sizes)}, expected positive counts of test images")
    return sizes


def _zero_shot_row(document: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """theta_0's counts on each task (absent in files from before it was stored: {})."""
    row = _optional(document, "zero_shot_row", dict) or {}
    if row:
        for counts in COUNTS:
            _counts(row.get(counts), f"zero_shot_row.{counts}", sizes)
    return row


def _control_sizes(document: dict[str, Any], zero_shot_row: dict[str, Any]) -> dict[str, int]:
    """The test images of each held-out control set, with theta_0's count on it checked."""
    controls = _optional(document, "control_sizes", dict) or {}
    zero = _optional(zero_shot_row, "control_correct", dict, "zero_shot_row.") or {}
    for name, size in controls.items():
        if not _is_int(size) or size < 1:
            raise Invalid(f"control_sizes.{name} is {_show(size)}, expected a positive count of test images")
        _count(zero.get(name), f"zero_shot_row.control_correct.{name}", size)
    return controls


def _method(name: str, entry: Any, sizes: list[int], controls: dict[str, int]) -> None:
    where = f"methods.{name}"
    if not isinstance(entry, dict):
        raise Invalid(f"{where} is {_show(entry)}, expected an object")
    if not _is_number(entry.get("alpha")):
        raise Invalid(f"{where}.alpha is {_show(entry.get('alpha'))}, expected a number (the method's lambda)")
    for counts in COUNTS:
        _matrix(entry.get(counts), f"{where}.{counts}", sizes)
    for control, row in (_optional(entry, "control_correct", dict, f"{where}.") or {}).items():
        if control not in controls:
            raise Invalid(f"{where}.control_correct.{control} has no test size in control_sizes")
        _counts(row, f"{where}.control_correct.{control}", [controls[control]] * len(sizes))


def _bookkeeping(document: dict[str, Any]) -> None:
    """The seed, and the config and store keys that group the runs and find their merge.alpha=auto curves."""
    if "seed" in document and not _is_int(document["seed"]):
        raise Invalid(f"seed is {_show(document['seed'])}, expected an integer")
    config = _optional(document, "config", dict) or {}
    for key in ("benchmark", "finetune"):
        _optional(config, key, dict, "config.")
    _optional(_optional(config, "paths", dict, "config.") or {}, "store", str, "config.paths.")
    store = _optional(document, "store", dict) or {}
    for name, key in (_optional(store, "merge", dict, "store.") or {}).items():
        if not isinstance(key, str):
            raise Invalid(f"store.merge.{name} is {_show(key)}, expected a string")
    if store.get("merge"):
        _required(store, "finetune", str, "store.")


def check_results(document: dict[str, Any]) -> None:
    """Everything of a results.json (a dict with schema_version, methods and test_sizes) that the report reads."""
    if document["schema_version"] != RESULTS_SCHEMA_VERSION:
        raise Invalid(f"schema_version is {_show(document['schema_version'])}, expected {RESULTS_SCHEMA_VERSION} "
                      "(written by another clmerge version)")
    sizes = _test_sizes(document)
    controls = _control_sizes(document, _zero_shot_row(document, sizes))
    for name, entry in _required(document, "methods", dict).items():
        _method(name, entry, sizes, controls)
    _bookkeeping(document)


def check_curve(curve: Any, where: str) -> None:
    """A merge.alpha=auto validation curve: the grid of lambdas, the accuracy at each, the chosen lambda."""
    if not isinstance(curve, dict):
        raise Invalid(f"{where} is {_show(curve)}, expected an object")
    grid, accuracy = curve.get("grid"), curve.get("accuracy")
    if not isinstance(grid, list) or not grid or not all(_is_number(a) for a in grid):
        raise Invalid(f"{where}.grid is {_show(grid)}, expected a list of numbers (the lambdas tried)")
    if not isinstance(accuracy, list) or len(accuracy) != len(grid) or not all(_is_number(a) for a in accuracy):
        raise Invalid(f"{where}.accuracy is {_show(accuracy)}, expected {len(grid)} numbers (one per lambda)")
    if not _is_number(curve.get("alpha")):
        raise Invalid(f"{where}.alpha is {_show(curve.get('alpha'))}, expected a number (the chosen lambda)")


def check_merge_record(document: Any) -> None:
    """A merge.json: the fine-tuning run it merged, and per method its record (with merge.alpha=auto, the curve)."""
    if not isinstance(document, dict):
        raise Invalid(f"the document is {_show(document)}, expected an object with finetune and methods")
    _required(document, "finetune", str)
    for name, record in _required(document, "methods", dict).items():
        if not isinstance(record, dict):
            raise Invalid(f"methods.{name} is {_show(record)}, expected an object")
        if "alpha_auto" in record:
            check_curve(record["alpha_auto"], f"methods.{name}.alpha_auto")
