"""Evaluate every model of a run: zero-shot, the fine-tuned models, and each method's merged models."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from clmerge.benchmarks import Benchmark
from clmerge.config import Config, FinetuneConfig
from clmerge.evaluation.accuracy import Counts, TestSet, count_correct
from clmerge.evaluation.control import controls
from clmerge.evaluation.head_cache import cached_head
from clmerge.evaluation.testset import decoded_split
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower
from clmerge.merging.job import fold
from clmerge.store import BASE_FILE, CheckpointDir, stored_vectors, task_file
from clmerge.training.regimes import own_merge


def finetuned_name(finetune: FinetuneConfig) -> str:
    """results.json's name of a run's fine-tuned models: seq_ft, ind_ft, joint, pam_task (PAM's aligned task
    models, before merging), or the regularizer (ewc, lwf)."""
    if finetune.regularizer != "none":
        return finetune.regularizer
    return {"sequential": "seq_ft", "independent": "ind_ft", "pam": "pam_task"}.get(finetune.regime, finetune.regime)


def merged_name(finetune: FinetuneConfig, method: str) -> str:
    """results.json's name of `method` merged over a run: `method` over seq-FT, `pam` for a PAM run's own
    merge (its deployed model), else e.g. ewc+magmax or pam_task+magmax."""
    source = finetuned_name(finetune)
    if source == "seq_ft":
        return method
    return "pam" if method == own_merge(finetune) else f"{source}+{method}"


def _repeated(row: dict[str, Any], times: int) -> dict[str, Any]:
    """One model's counts (one row) as the rows of every step."""
    return {"correct": row["correct"] * times, "correct_task_aware": row["correct_task_aware"] * times,
            "control_correct": {k: v * times for k, v in row["control_correct"].items()}}


@dataclass(frozen=True)
class Probe:
    """A test set and the head it is scored with: the benchmark's, or a control set's."""

    name: str
    head: torch.Tensor
    test: TestSet


def _rows(model: torch.nn.Module, main: Probe, controls: list[Probe], cfg: Config, device: torch.device,
          towers: Iterator[None]) -> dict[str, Any]:
    """Counts of each model that `towers` loads in turn (one row per step), on the benchmark and on every
    control set (task-agnostic counts, one per step)."""
    rows: list[Counts] = []
    control: dict[str, list[int]] = {probe.name: [] for probe in controls}
    for _ in towers:
        rows.append(count_correct(model, main.head, main.test, cfg.eval.batch_size, device))
        for probe in controls:
            control[probe.name].append(count_correct(model, probe.head, probe.test, cfg.eval.batch_size,
                                                     device).agnostic[0])
    return {"correct": [r.agnostic for r in rows], "correct_task_aware": [r.aware for r in rows],
            "control_correct": control}


@dataclass(frozen=True)
class Evaluation:
    """Count matrices of every evaluated model family, the zero-shot row A[0] and the test sizes n_j."""

    methods: dict[str, dict]  # name -> {"alpha", "correct", "correct_task_aware", "control_correct"}
    zero_shot: dict[str, Any]  # {"correct", "correct_task_aware"}: theta_0 on each task; "control_correct"
    sizes: list[int]
    control_sizes: dict[str, int]  # test samples of each control set (benchmark.control)


def evaluate_all(cfg: Config, benchmark: Benchmark, loaded: LoadedModel, source: CheckpointDir,
                 merges: dict[str, tuple[CheckpointDir, float]], device: torch.device, console: Console,
                 work_dir: Path) -> Evaluation:
    """Evaluate every model family after every step; theta_0 is always evaluated (one pass), since the
    transfer metrics compare with it."""
    model = loaded.model
    base = source.load(BASE_FILE)
    load_tower(model, base)
    heads_root = Path(cfg.paths.store) / "heads"
    head = cached_head(model, loaded.tokenizer, benchmark, device, heads_root)
    steps = range(len(benchmark.tasks))

    def zero_shot() -> Iterator[None]:
        load_tower(model, base)
        yield

    def finetuned(tasks: range) -> Iterator[None]:
        for t in tasks:
            load_tower(model, base, source.load(task_file(t)))
            yield

    def merged(method: str, alpha: float) -> Iterator[None]:
        for _, vector in fold(cfg, method, len(steps)):  # m_t folded on the fly, one pass over the tasks
            load_tower(model, base, vector, scale=alpha)
            yield

    results: dict[str, dict] = {}
    with ExitStack() as stack:
        pixels = loaded.eval_transform
        test = stack.enter_context(decoded_split(cfg, cfg.benchmark, benchmark, cfg.seed, pixels, work_dir))
        main = Probe(benchmark.name, head, test)
        probes = [Probe(c.name, cached_head(model, loaded.tokenizer, c.benchmark, device, heads_root),
                        stack.enter_context(decoded_split(cfg, c.config, c.benchmark, c.seed, pixels, work_dir)))
                  for c in controls(cfg.benchmark, cfg.paths.data, cfg.seed)]
        row = _rows(model, main, probes, cfg, device, zero_shot())
        if cfg.eval.baselines:
            results["zero_shot"] = {"alpha": 0.0, **_repeated(row, len(steps))}
            name = finetuned_name(cfg.finetune)
            vectors = stored_vectors(cfg, len(steps))  # joint training: one model, every step's model
            counts = _rows(model, main, probes, cfg, device, finetuned(range(vectors)))
            results[name] = {"alpha": 1.0, **(counts if vectors == len(steps) else _repeated(counts, len(steps)))}
        for method, (_, alpha) in merges.items():
            console.print(f"evaluating {method} (lambda={alpha:g}) after each of {len(steps)} steps")
            results[merged_name(cfg.finetune, method)] = {
                "alpha": alpha, **_rows(model, main, probes, cfg, device, merged(method, alpha))}
        sizes = test.sizes()
        control_sizes = {probe.name: probe.test.sizes()[0] for probe in probes}
    zero = {key: rows[0] for key, rows in row.items() if key != "control_correct"}
    zero["control_correct"] = {k: v[0] for k, v in row["control_correct"].items()}
    if benchmark.own_heads:  # multi-dataset: each task is scored with its own head only (SPEC.md 5)
        for entry in (*results.values(), zero):
            entry["correct"] = entry["correct_task_aware"]
    return Evaluation(results, zero, sizes, control_sizes)
