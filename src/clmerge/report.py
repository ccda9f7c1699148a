"""What a run leaves behind and shows: results.json, the terminal table, progress bars."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clmerge import __version__
from clmerge.benchmarks import Benchmark
from clmerge.config import Config, FinetuneConfig
from clmerge.evaluation.evaluate import Evaluation
from clmerge.evaluation.metrics import accuracy_matrix, summary, zero_shot_retention
from clmerge.reporting.schema import RESULTS_SCHEMA_VERSION
from clmerge.store import CheckpointDir, atomic_write_bytes, stored_vectors, task_file
from clmerge.training.finetune import steps_per_task



def training_progress(console: Console) -> Progress:
    """Progress bars of fine-tuning: steps, loss, throughput, elapsed time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} img/s"),
                    TimeElapsedColumn(), console=console)


def task_bar(progress: Progress, name: str, cfg: FinetuneConfig,
             num_examples: int) -> Callable[[int, float, float], None]:
    """Add a bar for one task; returns the callback that advances it after each optimizer step."""
    bar = progress.add_task(name, total=steps_per_task(cfg, num_examples), loss=float("nan"), rate=0.0)

    def on_step(step: int, loss: float, lr: float) -> None:
        elapsed = progress.tasks[bar].elapsed or 1e-9
        progress.update(bar, completed=step, loss=loss, rate=step * cfg.batch_size / elapsed)

    return on_step


class TrainingLog:
    """Optional CSV of every optimizer step (`finetune.log=csv`): task, step, lr, loss, seconds."""

    HEADER = "task,step,lr,loss,seconds\n"

    def __init__(self, path: Optional[Path]):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.HEADER)
        self._start = time.perf_counter()

    def step_callback(self, task: str,
                      then: Callable[[int, float, float], None]) -> Callable[[int, float, float], None]:
        """`then`, preceded by appending the step to the log when logging is on."""
        if self.path is None:
            return then

        def on_step(step: int, loss: float, lr: float) -> None:
            with open(self.path, "a") as handle:
                handle.write(f"{task},{step},{lr:.6g},{loss:.6g},{time.perf_counter() - self._start:.3f}\n")
            then(step, loss, lr)

        return on_step


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON document atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def method_entry(raw: dict[str, Any], zero_shot: dict[str, Any], sizes: list[int],
                 control_sizes: dict[str, int]) -> dict[str, Any]:
    """Matrices and metrics of one method, both protocols, from its count matrices and theta_0's counts;
    zero-shot retention on the control sets (scored with their all-class heads, so protocol-free)."""
    retention = zero_shot_retention(raw["control_correct"], zero_shot["control_correct"], control_sizes)
    return {
        "alpha": raw["alpha"],
        "correct": raw["correct"],
        "correct_task_aware": raw["correct_task_aware"],
        "accuracy_matrix": accuracy_matrix(raw["correct"], sizes),
        "accuracy_matrix_task_aware": accuracy_matrix(raw["correct_task_aware"], sizes),
        "control_correct": raw["control_correct"],
        **summary(raw["correct"], sizes, zero_shot["correct"]),
        **retention,
        "task_aware": {**summary(raw["correct_task_aware"], sizes, zero_shot["correct_task_aware"]), **retention},
    }


def training_records(source: CheckpointDir, num_tasks: int) -> list[dict[str, Any]]:
    """Each task's training record from the store's manifest (steps, peak lr, loss, speed, PAM's alignment
    diagnostics), without the file bookkeeping."""
    return [{k: v for k, v in source.info(task_file(i)).items() if k != "sha256"}
            for i in range(num_tasks)]


def results_document(cfg: Config, benchmark: Benchmark, source: CheckpointDir,
                     merges: dict[str, tuple[CheckpointDir, float]], evaluation: Evaluation,
                     timings: dict[str, float], curves: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """The versioned results.json of a run (DESIGN.md): accuracies are fractions in [0, 1]; `zero_shot_row`
    holds theta_0's counts c[0][j], the baseline of the transfer metrics; `curves`: per merge method, its
    merge.alpha=auto validation curve ({"alpha_auto": ...}, or {} for a configured lambda)."""
    sizes = evaluation.sizes
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "clmerge_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "store": {"finetune": source.manifest["key"],
                  "merge": {name: store.manifest["key"] for name, (store, _) in merges.items()}},
        "benchmark": benchmark.to_json(),
        "test_sizes": sizes,
        "zero_shot_row": evaluation.zero_shot,
        "control_sizes": evaluation.control_sizes,
        "precision": cfg.finetune.precision,
        "seed": cfg.seed,
        "timings_s": timings,
        "training": training_records(source, stored_vectors(cfg, len(benchmark.tasks))),
        "methods": {name: {**method_entry(raw, evaluation.zero_shot, sizes, evaluation.control_sizes),
                           **(curves or {}).get(name, {})}
                    for name, raw in evaluation.methods.items()},
    }


def _pct(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{round(100 * value, 1) + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0


def _metrics_row(entry: dict[str, Any]) -> list[str]:
    return [_pct(entry["final_accuracy"]), _pct(entry["final_accuracy_weighted"]),
            _pct(entry["average_incremental_accuracy"]), _pct(entry["forgetting"]),
            _pct(entry["backward_transfer"]), _pct(entry["forward_transfer"]),
            _pct(entry.get("zero_shot_retention_final"))]


def print_results(results: dict[str, Any], console: Console) -> None:
    """Three terminal tables (%): accuracy on each task after the last step, then the metrics under the
    task-agnostic and the task-aware protocol."""
    title = f"{results['benchmark']['name']}, seed {results['seed']}"
    per_task = Table(title=f"{title}: accuracy on each task after the last step (all-class head, %)")
    agnostic = Table(title=f"{title}: metrics, task-agnostic (all-class head, %)")
    aware = Table(title=f"{title}: metrics, task-aware (each task's own classes, %)")
    for table in (per_task, agnostic, aware):
        table.add_column("method", no_wrap=True)
        table.add_column("λ", justify="right")
    for task in results["benchmark"]["tasks"]:
        per_task.add_column(task["name"], justify="right")
    for table in (agnostic, aware):
        for header in ("final", "final w", "AIA", "forget", "BWT", "FWT", "ZR"):
            table.add_column(header, justify="right", no_wrap=True)
    for method, entry in results["methods"].items():
        alpha = f"{entry['alpha']:g}"
        per_task.add_row(method, alpha, *(_pct(a) for a in entry["accuracy_matrix"][-1]))
        agnostic.add_row(method, alpha, *_metrics_row(entry))
        aware.add_row(method, alpha, *_metrics_row(entry["task_aware"]))
    for table in (per_task, agnostic, aware):
        console.print(table)
    console.print("[dim]final: mean over tasks after the last step; final w: weighted by test samples (the "
                  "reference's headline); AIA: average incremental accuracy; forget: forgetting; "
                  "FWT: accuracy on the next task minus zero-shot; ZR: accuracy on the held-out control sets "
                  "(benchmark.control) minus zero-shot's[/dim]")
