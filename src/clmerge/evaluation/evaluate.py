"""Evaluate every model of a run: zero-shot, the fine-tuned models, and each method's merged models."""

from __future__ import annotations

from typing import Iterator

import torch
from rich.console import Console

from clmerge.benchmarks import Benchmark
from clmerge.benchmarks.head import benchmark_head
from clmerge.config import Config
from clmerge.data.registry import task_split
from clmerge.evaluation.accuracy import Counts, TestSet, collect_test_set, count_correct
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower
from clmerge.merging.job import fold
from clmerge.store import BASE_FILE, CheckpointDir, task_file

Tensors = dict[str, torch.Tensor]


def _rows(model: torch.nn.Module, head: torch.Tensor, test: TestSet, cfg: Config, device: torch.device,
          towers: Iterator[None]) -> dict[str, list[list[int]]]:
    """Counts of each model that `towers` loads in turn (one row per step)."""
    rows: list[Counts] = []
    for _ in towers:
        rows.append(count_correct(model, head, test, cfg.eval.batch_size, device))
    return {"correct": [r.agnostic for r in rows], "correct_task_aware": [r.aware for r in rows]}


def evaluate_all(cfg: Config, benchmark: Benchmark, loaded: LoadedModel, source: CheckpointDir,
                 merges: dict[str, tuple[CheckpointDir, float]], device: torch.device,
                 console: Console) -> dict[str, dict]:
    """Count matrices of every evaluated model family, keyed by method name."""
    model = loaded.model
    base = source.load(BASE_FILE)
    load_tower(model, base)
    head = benchmark_head(model, loaded.tokenizer, benchmark, device)
    test = collect_test_set([task_split(cfg.benchmark, task, "test", cfg.seed, cfg.paths.data,
                                       loaded.eval_transform) for task in benchmark.tasks],
                            [task.classes for task in benchmark.tasks], benchmark.num_classes)
    steps = range(len(benchmark.tasks))

    def zero_shot() -> Iterator[None]:
        load_tower(model, base)
        yield
        
    def finetuned() -> Iterator[None]:
        for t in steps:
            load_tower(model, base, source.load(task_file(t)))
            yield

    def merged(method: str, alpha: float) -> Iterator[None]:
        for _, vector in fold(cfg, method, len(steps)):  # m_t folded on the fly, one pass over the tasks
            load_tower(model, base, vector, scale=alpha)
            yield

    results: dict[str, dict] = {}
    if cfg.eval.baselines:
        row = _rows(model, head, test, cfg, device, zero_shot())
        results["zero_shot"] = {"alpha": 0.0, **{k: v * len(steps) for k, v in row.items()}}
        name = "seq_ft" if cfg.finetune.regime == "sequential" else "ind_ft"
        results[name] = {"alpha": 1.0, **_rows(model, head, test, cfg, device, finetuned())}
    for method, (_, alpha) in merges.items():
        console.print(f"evaluating {method} (lambda={alpha:g}) after each of {len(steps)} steps")
        results[method] = {"alpha": alpha, **_rows(model, head, test, cfg, device, merged(method, alpha))}
    for entry in results.values():
        entry["test_sizes"] = test.sizes()
        if benchmark.own_heads:  # multi-dataset: each task is scored with its own head only (SPEC.md 5)
            entry["correct"] = entry["correct_task_aware"]
    return results
