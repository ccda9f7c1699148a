"""merge.alpha=auto: lambda chosen on a grid by accuracy on validation splits, never on test data.

Each task's validation split (`task_split(..., "val", seed)`) is held out of its training data: a share
benchmark.val_fraction of a real task's training images, which fine-tuning then never sees; the built-in
world renders benchmark.world.val_per_class images per class apart from the training ones. The
score of a lambda is the sample-weighted task-agnostic accuracy of theta_0 + lambda * m_T over the union
of all tasks' validation splits (the final model, as the reference's headline); ties go to the smaller
lambda. The whole curve is recorded. Real validation images are decoded once into a memory-mapped file
(eval.image_cache_dir, else the system's temporary folder), as the test images are.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from clmerge.benchmarks import Benchmark
from clmerge.benchmarks.head import benchmark_head
from clmerge.config import Config
from clmerge.errors import UserError
from clmerge.evaluation.accuracy import count_correct
from clmerge.evaluation.testset import decoded_split
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AlphaCurve:
    """Validation accuracy of each lambda of the grid, the chosen lambda, and which validation images
    (`validation_split`): a curve is reused only for the same grid and the same images."""

    grid: list[float]
    accuracy: list[float]
    alpha: float
    validation: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def validation_split(cfg: Config) -> dict[str, float]:
    """What decides a run's validation images besides its store key (the world's count per class is not in
    the key: the world renders them apart from the training images)."""
    return {"val_fraction": cfg.benchmark.val_fraction, "world_val_per_class": cfg.benchmark.world.val_per_class}


def parse_alpha(value: Any) -> Optional[float | str]:
    """A configured lambda: None (the method's default), a finite number, or "auto"; anything else is an error."""
    if value is None or value == "auto":
        return value
    try:
        alpha = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        alpha = None
    if alpha is None or not math.isfinite(alpha):
        raise UserError(f"merge.alpha={value} is not a finite number; use a number, e.g. merge.alpha=0.5, "
                        "null (the method's default) or auto")
    return alpha


def check_validation_split(cfg: Config) -> None:
    """merge.alpha=auto needs validation data: refuse before any work when there is none."""
    if cfg.benchmark.dataset == "world" and cfg.benchmark.world.val_per_class <= 0:
        raise UserError("merge.alpha=auto picks lambda on validation data, but benchmark.world.val_per_class is 0; "
                        "set benchmark.world.val_per_class=N (N > 0) or give a number, e.g. merge.alpha=0.5")
    if cfg.benchmark.dataset != "world" and cfg.benchmark.val_fraction <= 0:
        raise UserError("merge.alpha=auto picks lambda on images held out of training, but benchmark.val_fraction "
                        "is 0; set benchmark.val_fraction=0.1 (and fine-tune again: it then leaves those images out) "
                        "or give a number, e.g. merge.alpha=0.5")
    if not cfg.merge.alpha_grid:
        raise UserError("merge.alpha=auto needs a grid; set merge.alpha_grid=[0.1,0.2,...]")
    if not all(math.isfinite(alpha) for alpha in cfg.merge.alpha_grid):
        raise UserError(f"merge.alpha_grid={list(cfg.merge.alpha_grid)} holds a value that is not a finite number; "
                        "use finite numbers, e.g. merge.alpha_grid=[0.1,0.2,0.3]")


def alpha_curve(cfg: Config, loaded: LoadedModel, benchmark: Benchmark, base: Tensors, merged: Tensors,
                device: torch.device) -> AlphaCurve:
    """Validation accuracy of theta_0 + lambda * merged for every lambda of cfg.merge.alpha_grid."""
    check_validation_split(cfg)
    model = loaded.model
    load_tower(model, base)
    head = benchmark_head(model, loaded.tokenizer, benchmark, device)
    grid = [float(a) for a in cfg.merge.alpha_grid]
    accuracy = []
    with decoded_split(cfg, cfg.benchmark, benchmark, cfg.seed, loaded.eval_transform, Path(tempfile.gettempdir()),
                       "val") as val:
        for alpha in grid:
            load_tower(model, base, merged, scale=alpha)
            counts = count_correct(model, head, val, cfg.eval.batch_size, device)
            correct = counts.aware if benchmark.own_heads else counts.agnostic  # multi-dataset: own heads
            accuracy.append(sum(correct) / max(sum(val.sizes()), 1))
    best = max(range(len(grid)), key=lambda i: (accuracy[i], -grid[i]))
    return AlphaCurve(grid, accuracy, grid[best], validation_split(cfg))
