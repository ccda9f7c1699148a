"""The merge job: fold a method over a finished fine-tuning run and keep the merged vectors in the store."""

from __future__ import annotations

import time

from rich.console import Console

from clmerge.config import Config
from clmerge.merging.engine import merge_steps
from clmerge.merging.methods import get_method, resolve_alpha
from clmerge.store import CheckpointDir, finished_finetune, merge_dir, step_file, task_file


def alpha_for(cfg: Config, method_name: str) -> float:
    """lambda of a method: cfg.merge.alpha for the configured method, the method's default otherwise."""
    configured = cfg.merge.alpha if method_name == cfg.merge.method else None
    return resolve_alpha(get_method(method_name), configured)


def merged_steps(cfg: Config, method_name: str, num_tasks: int, console: Console) -> CheckpointDir:
    """The per-step merged vectors of `method_name` (computed once, then read from the store)."""
    method = get_method(method_name)
    source = finished_finetune(cfg, num_tasks)
    target = merge_dir(cfg, method.name, params={})
    steps = [step_file(t) for t in range(1, num_tasks + 1)]
    if all(target.has(name) for name in steps):
        return target
    with target.lock():
        start = time.perf_counter()
        for t, merged in merge_steps(lambda i: source.load(task_file(i)), num_tasks, method):
            target.save(step_file(t), merged, step=t)
        target.manifest["seconds"] = time.perf_counter() - start
        target.write_manifest()
    console.print(f"merged {num_tasks} steps with {method.name} in {target.manifest['seconds']:.2f} s")
    return target
