"""The merge job: fold a method over a finished fine-tuning run, store m_T (and m_t when asked) with
diagnostics, resolve lambda (a number, the default, or auto) and export the merged model."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.console import Console

from clmerge.benchmarks import Benchmark
from clmerge.config import Config, ModelConfig
from clmerge.errors import UserError
from clmerge.merging.alpha import AlphaCurve, alpha_curve, parse_alpha, validation_split
from clmerge.merging.diagnostics import diagnostics
from clmerge.merging.engine import merge_final, merge_steps
from clmerge.merging.methods import MergeMethod, MergeParams, get_method, resolve_alpha
from clmerge.merging.reader import TensorFile
from clmerge.models.loading import LoadedModel, meta_model
from clmerge.models.lora import dense_delta
from clmerge.store import (BASE_FILE, FINAL_FILE, CheckpointDir, finished_finetune, lora_file, merge_dir,
                           step_file, task_file)

Tensors = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def full_model_entries(model: ModelConfig) -> int:
    """Floating entries of the complete model state dict (TIES' N_ref), counted on the meta device."""
    return sum(t.numel() for t in meta_model(model).state_dict().values() if t.dtype.is_floating_point)


def check_merge_settings(cfg: Config) -> None:
    """The merge.* knobs every merge reads (ties, dare, granularity); needs no model or data."""
    ties, dare = cfg.merge.ties, cfg.merge.dare
    if ties.scope not in ("global", "tensor"):
        raise UserError(f"merge.ties.scope={ties.scope} is not valid; use global or tensor")
    if ties.k_denominator not in ("full_model", "stored"):
        raise UserError(f"merge.ties.k_denominator={ties.k_denominator} is not valid; use full_model or stored")
    if not 0.0 <= ties.k <= 1.0:
        raise UserError(f"merge.ties.k={ties.k} is not valid; use a share in [0, 1], e.g. merge.ties.k=0.2")
    if not 0.0 <= dare.p < 1.0:
        raise UserError(f"merge.dare.p={dare.p} is not valid; use a drop rate in [0, 1), e.g. merge.dare.p=0.5")
    merges_factors(cfg)  # checks merge.granularity


def merge_params(cfg: Config, method: MergeMethod) -> MergeParams:
    """The MergeParams of `method` under cfg.merge (checked)."""
    check_merge_settings(cfg)
    ties, dare = cfg.merge.ties, cfg.merge.dare
    # the reference's N_ref counts the dense model's entries; LoRA factors are a different, far smaller set, over
    # which that N_ref would keep everything: factor merges trim over their stored entries
    uses_reference = (method.sparsify == "topk" and ties.scope == "global" and ties.k_denominator == "full_model"
                      and not merges_factors(cfg))
    return MergeParams(seed=cfg.seed, ties_k=ties.k, ties_scope=ties.scope, dare_p=dare.p,
                       ties_denominator=full_model_entries(cfg.model) if uses_reference else None)


def merges_factors(cfg: Config) -> bool:
    """Whether merges combine LoRA factors (then deploy their product) rather than dense task vectors:
    merge.granularity=factors, or auto on a PAM run (PAM averages factors while it trains)."""
    granularity = cfg.merge.granularity
    if granularity not in ("auto", "product", "factors"):
        raise UserError(f"merge.granularity={granularity} is not valid; use auto, product or factors")
    if cfg.finetune.adapter != "lora":
        return False
    return granularity == "factors" or (granularity == "auto" and cfg.finetune.regime == "pam")


def check_mergeable(cfg: Config) -> None:
    """Joint training leaves one model, not a sequence of task vectors: nothing to merge."""
    if cfg.finetune.regime == "joint":
        raise UserError("finetune.regime=joint leaves one model and nothing to merge; merge a sequential, "
                        "independent, ewc or lwf run")


def method_store(cfg: Config, name: str) -> CheckpointDir:
    """The merge directory of method `name` (it may not exist yet)."""
    method = get_method(name)
    extra = {"granularity": "factors"} if merges_factors(cfg) else {}
    return merge_dir(cfg, method.name, {**method.key_params(merge_params(cfg, method)), **extra})


def task_sources(cfg: Config, source: CheckpointDir, num_tasks: int, stack: ExitStack) -> list[TensorFile]:
    """The vectors a merge folds (task vectors, or LoRA factors), hash-checked, closed with `stack`."""
    name = lora_file if merges_factors(cfg) else task_file
    return [stack.enter_context(TensorFile(source.verified_path(name(i)))) for i in range(num_tasks)]


def densifier(cfg: Config, source: CheckpointDir) -> Callable[[Tensors], Tensors]:
    """Turns a merged vector into a dense tower delta: merged LoRA factors become (alpha / r) B A (theta_0,
    for the tower's keys and shapes, is read once); dense merges pass through."""
    if not merges_factors(cfg):
        return lambda merged: merged
    lora, base = cfg.finetune.lora, source.load(BASE_FILE)
    return lambda merged: dense_delta(merged, base, lora.alpha / lora.r)


def fold(cfg: Config, name: str, num_tasks: int, every_step: bool = True):
    """Yield (t, m_t) of method `name` over the fine-tuning run of cfg, folded on the fly (dense)."""
    method = get_method(name)
    params = merge_params(cfg, method)
    source = finished_finetune(cfg, num_tasks)
    dense = densifier(cfg, source)
    with ExitStack() as stack:
        for t, merged in merge_steps(task_sources(cfg, source, num_tasks, stack), method, params, every_step):
            yield t, dense(merged)


def is_stored(target: CheckpointDir, names: list[str]) -> bool:
    """Whether every file of `names` is stored in `target`; the final merge, the one merge.json points to, is
    hash-checked (a damaged one is a one-line error naming it: delete it and rerun); step files are checked
    by the evaluation that loads them."""
    if not all(target.has(name) for name in names):
        return False
    target.verified_path(FINAL_FILE)
    return True


def merged_store(cfg: Config, name: str, num_tasks: int, console: Console) -> CheckpointDir:
    """Store m_T (and every m_t if merge.save_steps) with diagnostics; computed once, then reused."""
    method = get_method(name)
    params = merge_params(cfg, method)
    source = finished_finetune(cfg, num_tasks)
    target = method_store(cfg, name)
    steps = [step_file(t) for t in range(1, num_tasks + 1)] if cfg.merge.save_steps else []
    if is_stored(target, [FINAL_FILE, *steps]):
        return target
    with ExitStack() as stack:
        sources = task_sources(cfg, source, num_tasks, stack)  # checked before the target folder is made
        dense = densifier(cfg, source)
        with target.lock():  # re-reads the manifest: a job that held the lock may have merged it meanwhile
            if is_stored(target, [FINAL_FILE, *steps]):
                return target
            start = time.perf_counter()
            merged: Tensors = {}
            for t, merged in merge_steps(sources, method, params, every_step=bool(steps)):
                if steps:
                    target.save(step_file(t), dense(merged), step=t)
            target.save(FINAL_FILE, dense(merged), step=num_tasks)
            target.manifest["seconds"] = time.perf_counter() - start
            target.manifest["diagnostics"] = diagnostics(sources, merged, owners=method.name == "magmax")
            target.write_manifest()
    console.print(f"merged {num_tasks} tasks with {method.name} in {target.manifest['seconds']:.2f} s")
    return target


@dataclass
class Deployment:
    """What deploying a merge needs beyond the vectors: the model, theta_0 and the benchmark (lazy)."""

    cfg: Config
    loaded: LoadedModel
    benchmark: Benchmark
    device: torch.device

    @cached_property
    def base(self) -> Tensors:
        return finished_finetune(self.cfg, len(self.benchmark.tasks)).load(BASE_FILE)


def configured_alpha(cfg: Config, name: str) -> Optional[float | str]:
    """merge.alpha applies to merge.method; every other method uses its default."""
    return parse_alpha(cfg.merge.alpha) if name == cfg.merge.method else None


def resolve(cfg: Config, name: str, deployment: Optional[Deployment]) -> tuple[float, Optional[AlphaCurve]]:
    """lambda of method `name` and, for merge.alpha=auto, the validation curve that chose it."""
    setting = configured_alpha(cfg, name)
    if setting != "auto":
        return resolve_alpha(get_method(name), setting), None
    if deployment is None:
        raise ValueError("merge.alpha=auto needs a Deployment")
    store = method_store(cfg, name)
    cached = store.manifest.get("alpha_auto")
    if (cached and cached["grid"] == [float(a) for a in cfg.merge.alpha_grid]
            and cached.get("validation") == validation_split(cfg)):
        return cached["alpha"], AlphaCurve(**cached)
    final = merge_final_of(cfg, name, store, len(deployment.benchmark.tasks))
    curve = alpha_curve(cfg, deployment.loaded, deployment.benchmark, deployment.base, final, deployment.device)
    return curve.alpha, curve


def merge_final_of(cfg: Config, name: str, store: CheckpointDir, num_tasks: int) -> Tensors:
    """m_T: from the store if merged already, else folded on the fly."""
    if store.has(FINAL_FILE):
        return store.load(FINAL_FILE)
    method = get_method(name)
    source = finished_finetune(cfg, num_tasks)
    with ExitStack() as stack:
        merged = merge_final(task_sources(cfg, source, num_tasks, stack), method, merge_params(cfg, method))
    return densifier(cfg, source)(merged)


def record_auto(store: CheckpointDir, curve: Optional[AlphaCurve]) -> dict[str, Any]:
    """Keep the validation curve in the merge manifest (so later commands reuse it); returns it for merge.json
    and results.json."""
    if curve is None:
        return {}
    try:
        with store.lock():  # re-reads the manifest: another process may have added files to it
            store.manifest["alpha_auto"] = curve.to_json()
            store.write_manifest()
    except OSError as exc:  # a read-only store: the merge itself never needed to write there
        log.warning("could not keep the merge.alpha=auto curve in %s (%s); later commands will recompute it",
                    store.path, exc.strerror or exc)
    return {"alpha_auto": curve.to_json()}


def export(deployment: Deployment, name: str, store: CheckpointDir, alpha: float, path: Path) -> Path:
    """Write theta_0 + alpha * m_T as a full open_clip checkpoint."""
    from clmerge.merging.export import export_checkpoint

    cfg = deployment.cfg
    final = merge_final_of(cfg, name, store, len(deployment.benchmark.tasks))
    metadata = {"format": "pt", "clmerge_method": name, "alpha": alpha, "model": cfg.model.name,
                "merge_key": store.manifest["key"]}
    return export_checkpoint(deployment.loaded, deployment.base, final, alpha, path, metadata)
