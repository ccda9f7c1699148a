"""Evaluate every model of a run: zero-shot, the fine-tuned models, and each method's merged models."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console

from clmerge.benchmarks import Benchmark
from clmerge.config import Config
from clmerge.data.registry import task_split
from clmerge.evaluation.accuracy import Counts, TestSet, collect_test_set, count_correct
from clmerge.evaluation.head_cache import cached_head
from clmerge.evaluation.testset import split_normalize
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower
from clmerge.merging.job import fold
from clmerge.store import BASE_FILE, CheckpointDir, task_file



@contextmanager
def decoded_test_set(cfg: Config, benchmark: Benchmark, loaded: LoadedModel, work_dir: Path) -> Iterator[TestSet]:
    """Every task's test split, decoded once (real images into a memory-mapped file under `work_dir`, or
    eval.image_cache_dir, deleted when evaluation ends)."""
    pixels, normalize = split_normalize(loaded.eval_transform)
    cache = Path(cfg.eval.image_cache_dir or work_dir) / f".test_images-{os.getpid()}.npy"  # one per job
    try:
        yield collect_test_set([task_split(cfg.benchmark, task, "test", cfg.seed, cfg.paths.data, pixels)
                                for task in benchmark.tasks],
                               [task.classes for task in benchmark.tasks], benchmark.num_classes,
                               cache=cache, normalize=normalize, num_workers=cfg.eval.num_workers)
    finally:
        cache.unlink(missing_ok=True)


def _rows(model: torch.nn.Module, head: torch.Tensor, test: TestSet, cfg: Config, device: torch.device,
          towers: Iterator[None]) -> dict[str, list[list[int]]]:
    """Counts of each model that `towers` loads in turn (one row per step)."""
    rows: list[Counts] = []
    for _ in towers:
        rows.append(count_correct(model, head, test, cfg.eval.batch_size, device))
    return {"correct": [r.agnostic for r in rows], "correct_task_aware": [r.aware for r in rows]}


@dataclass(frozen=True)
class Evaluation:
    """Count matrices of every evaluated model family, the zero-shot row A[0] and the test sizes n_j."""

    methods: dict[str, dict]  # name -> {"alpha", "correct", "correct_task_aware"}
    zero_shot: dict[str, list[int]]  # {"correct", "correct_task_aware"}: theta_0 on each task
    sizes: list[int]


def evaluate_all(cfg: Config, benchmark: Benchmark, loaded: LoadedModel, source: CheckpointDir,
                 merges: dict[str, tuple[CheckpointDir, float]], device: torch.device, console: Console,
                 work_dir: Path) -> Evaluation:
    """Evaluate every model family after every step; theta_0 is always evaluated (one pass), since the
    transfer metrics compare with it."""
    model = loaded.model
    base = source.load(BASE_FILE)
    load_tower(model, base)
    head = cached_head(model, loaded.tokenizer, benchmark, device, Path(cfg.paths.store) / "heads")
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
    with decoded_test_set(cfg, benchmark, loaded, work_dir) as test:
        row = _rows(model, head, test, cfg, device, zero_shot())
        if cfg.eval.baselines:
            results["zero_shot"] = {"alpha": 0.0, **{k: v * len(steps) for k, v in row.items()}}
            name = "seq_ft" if cfg.finetune.regime == "sequential" else "ind_ft"
            results[name] = {"alpha": 1.0, **_rows(model, head, test, cfg, device, finetuned())}
        for method, (_, alpha) in merges.items():
            console.print(f"evaluating {method} (lambda={alpha:g}) after each of {len(steps)} steps")
            results[method] = {"alpha": alpha, **_rows(model, head, test, cfg, device, merged(method, alpha))}
        sizes = test.sizes()
    zero = {key: rows[0] for key, rows in row.items()}
    if benchmark.own_heads:  # multi-dataset: each task is scored with its own head only (SPEC.md 5)
        for entry in (*results.values(), zero):
            entry["correct"] = entry["correct_task_aware"]
    return Evaluation(results, zero, sizes)
