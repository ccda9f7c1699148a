"""The three jobs (finetune, merge, eval) and `run`, over one checkpoint store.

Each job takes the typed `Config` once and plain paths; none reads Hydra state.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from clmerge import report
from clmerge.benchmarks import Benchmark, build_benchmark
from clmerge.benchmarks.head import benchmark_head
from clmerge.config import Config
from clmerge.data.registry import derived_seed
from clmerge.errors import UserError
from clmerge.evaluation.evaluate import evaluate_all
from clmerge.merging.engine import check_finite
from clmerge.merging.export import check_export_path
from clmerge.merging.job import (Deployment, check_mergeable, configured_alpha, export, merged_store, method_store,
                                 record_auto, resolve)
from clmerge.models.loading import LoadedModel, load_model
from clmerge.models.tower import freeze_all_but_tower, snapshot
from clmerge.store import BASE_FILE, finetune_dir, finished_finetune, holds_every_vector, task_file
from clmerge.training.distributed import RankStore, from_main, join, main_process
from clmerge.training.finetune import check_recipe, task_recipe, train_task
from clmerge.training.precision import resolve_device, with_precision
from clmerge.training.regimes import RegimeContext, evaluated_methods, make_regime, make_tower
from clmerge.training.resume import resumable


def _prepare(cfg: Config) -> torch.device:
    """Threads and device of a job."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.finetune.device)


def _model_and_benchmark(cfg: Config, device: torch.device) -> tuple[LoadedModel, Benchmark]:
    benchmark = build_benchmark(cfg.benchmark, cfg.paths.data, cfg.seed)
    return load_model(cfg.model, device, init_seed=derived_seed(cfg.seed, "init")), benchmark


def _check_base(store: RankStore, base: dict[str, torch.Tensor]) -> None:
    """The stored theta_0 (hash-checked) must be the pretrained weights loaded now."""
    if any(not torch.equal(base[k], v) for k, v in store.load(BASE_FILE).items()):
        raise UserError(f"the pretrained weights differ from {store.path / BASE_FILE}; "
                        f"delete {store.path} or use another paths.store")


def _complete(store: RankStore, cfg: Config, num_tasks: int) -> bool:
    """Whether the run is marked complete and holds theta_0 and every task vector: nothing is left to write.

    Manifests are replaced atomically and a complete run never changes, so this needs no lock (as eval
    reads a run without one), and a read-only store serves."""
    return store.manifest.get("status") == "complete" and holds_every_vector(store.store, cfg, num_tasks)


def finetune(cfg: Config, console: Console, output_dir: Optional[Path] = None) -> Path:
    """Fine-tune every task of the benchmark (skipping tasks already in the store); returns the run's dir.

    With `finetune.log=csv`, every optimizer step is appended to output_dir/training_log.csv. A task resumes
    from its latest step checkpoint (finetune.checkpoint_every, or SIGTERM, which stops the run: `Preempted`).
    A complete run is only checked (theta_0 against the pretrained weights), without taking its lock.
    """
    check_recipe(cfg.finetune)
    cfg = with_precision(cfg, check=True)
    csv = cfg.finetune.log == "csv" and output_dir and main_process()
    log = report.TrainingLog(output_dir / "training_log.csv" if csv else None)
    shard, device = join(cfg.finetune.distributed, _prepare(cfg))
    loaded, benchmark = _model_and_benchmark(cfg, device)
    store = RankStore(finetune_dir(cfg), shard)
    params = freeze_all_but_tower(loaded.model)
    base = snapshot(loaded.model)
    if from_main(_complete(store, cfg, len(benchmark.tasks)), shard):  # every rank takes the same path
        _check_base(store, base)
        console.print(f"[dim]every task is fine-tuned already ({store.path}), skipped[/dim]")
        return store.path
    tower = make_tower(cfg, loaded.model, params, base, derived_seed(cfg.seed, "lora_init"))
    with store.lock(), resumable(store.store) as resume:
        if store.has(BASE_FILE):
            _check_base(store, base)
        else:
            store.manifest["benchmark"] = benchmark.to_json()
            store.save(BASE_FILE, base, role="theta_0")
        head_all = benchmark_head(loaded.model, loaded.tokenizer, benchmark, device)
        restrict = benchmark.setting != "domain_incremental"  # a task's own classes (SPEC.md 3.3)
        regime = make_regime(RegimeContext(cfg, store, loaded.model, params, base, tower, benchmark, head_all,
                                           device, loaded.train_transform, loaded.eval_transform))
        with report.training_progress(console) as progress:
            for task in regime.tasks():
                if store.has(task_file(task.index)):
                    console.print(f"[dim]{task.name}: already fine-tuned, skipped[/dim]")
                    continue
                tower.begin(regime.start(task))
                dataset = regime.train_set(task)
                recipe = regime.recipe(task, dataset)
                checkpoints = resume.task(task.index, cfg.finetune.checkpoint_every)
                stats = train_task(loaded.model, list(tower.params().values()),
                                   task_recipe(head_all, task.classes, restrict), dataset,
                                   recipe, derived_seed(cfg.seed, "shuffle", task.index), device,
                                   on_step=log.step_callback(
                                       task.name, report.task_bar(progress, task.name, recipe, len(dataset))),
                                   hooks=regime.hooks(task, dataset), shard=shard, checkpoints=checkpoints)
                vector = tower.end()
                check_finite(vector, f"the task vector of {task.name}")
                for name, tensors in regime.finish(task, vector).items():
                    store.save(name, tensors, task=task.name, **asdict(stats), **regime.record(task))
                checkpoints.finished()
        store.manifest["status"] = "complete"
        store.write_manifest()
    return store.path


def merge(cfg: Config, console: Console, methods: Optional[list[str]] = None,
          output_dir: Optional[Path] = None) -> dict[str, Path]:
    """Merge the task vectors with each method (default: cfg.merge.method), resolve lambda (merge.alpha=auto:
    on validation data) and export if merge.export is set; writes merge.json to output_dir."""
    check_mergeable(cfg)
    names = methods or [cfg.merge.method]
    cfg = with_precision(cfg, check=False)
    benchmark = build_benchmark(cfg.benchmark, cfg.paths.data, cfg.seed)
    num_tasks = len(benchmark.tasks)
    if cfg.merge.export and len(names) > 1:
        raise UserError("--export writes one model; merge one method at a time")
    if cfg.merge.export:  # before any merge: the CLI checks it in preflight, library callers here
        check_export_path(Path(cfg.merge.export), Path(cfg.paths.store))
    stores = {name: merged_store(cfg, name, num_tasks, console) for name in names}
    needs_model = cfg.merge.export or any(configured_alpha(cfg, name) == "auto" for name in names)
    deployment = None
    if needs_model:
        device = _prepare(cfg)
        deployment = Deployment(cfg, load_model(cfg.model, device, init_seed=derived_seed(cfg.seed, "init")),
                                benchmark, device)
    record = {}
    for name, store in stores.items():
        alpha, curve = resolve(cfg, name, deployment)
        record[name] = {"store": str(store.path), "alpha": alpha, **record_auto(store, curve)}
        if cfg.merge.export and deployment is not None:
            path = export(deployment, name, store, alpha, Path(cfg.merge.export))
            record[name]["export"] = str(path)
            console.print(f"exported {name} (lambda={alpha:g}) to {path}")
    if output_dir is not None:
        report.write_json(output_dir / "merge.json", {"finetune": str(finetune_dir(cfg).path), "methods": record})
    return {name: store.path for name, store in stores.items()}


def evaluate(cfg: Config, console: Console, output_dir: Path, timings: Optional[dict[str, float]] = None) -> dict:
    """Evaluate zero-shot, the fine-tuned models and every merged model after every step on every task."""
    cfg = with_precision(cfg, check=False)
    device = _prepare(cfg)
    loaded, benchmark = _model_and_benchmark(cfg, device)
    num_tasks = len(benchmark.tasks)
    source = finished_finetune(cfg, num_tasks)
    deployment = Deployment(cfg, loaded, benchmark, device)
    names = evaluated_methods(cfg)
    if cfg.finetune.regime == "joint" and cfg.eval.methods:
        console.print("[dim]joint training leaves one model: eval.methods (merges) are not evaluated[/dim]")
    merges, curves = {}, {}
    for name in names:
        store = method_store(cfg, name)
        alpha, curve = resolve(cfg, name, deployment)
        merges[name], curves[name] = (store, alpha), record_auto(store, curve)
    start = time.perf_counter()
    evaluation = evaluate_all(cfg, benchmark, loaded, source, merges, device, console, output_dir)
    timings = {**(timings or {}), "eval": time.perf_counter() - start}
    results = report.results_document(cfg, benchmark, source, merges, evaluation, timings, curves)
    report.write_json(output_dir / "results.json", results)
    report.print_results(results, console)
    console.print(f"results: {output_dir / 'results.json'}")
    return results


def run(cfg: Config, console: Console, output_dir: Path) -> dict:
    """finetune, then evaluate (which merges with every method of cfg.eval.methods as it goes)."""
    start = time.perf_counter()
    finetune(cfg, console, output_dir)
    if not main_process():
        return {}  # under torchrun, rank 0 evaluates
    return evaluate(cfg, console, output_dir, timings={"finetune": time.perf_counter() - start})
