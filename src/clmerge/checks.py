"""Cheap checks of a whole `Config` that need no data or model: counts, ranges, names and choices.

Run before Hydra writes anything (`hydra_app`'s preflight), so that a mistake ends as one line with exit
status 2 and nothing written. The benchmark builder and `check_recipe` check the rest.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from clmerge.config import REGIMES, Config
from clmerge.data.world import DOMAINS
from clmerge.errors import UserError
from clmerge.merging.methods import get_method
from clmerge.training.precision import PRECISIONS

# Names that become part of store keys and output paths: letters, digits and . _ + - only.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
# open_clip model names may also hold ':' and '/' (hf-hub:org/name); never '..', spaces or control characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:/-]{0,199}")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_config(cfg: Config) -> None:
    """Raise a one-line UserError for the first value no run could use."""
    _check_names(cfg)
    _check_counts(cfg)
    _check_recipe_values(cfg)
    for key, value in (("paths.store", cfg.paths.store), ("paths.output", cfg.paths.output)):
        _check_directory(key, value)


def _check_directory(key: str, value: str) -> None:
    """A directory setting must name a folder that exists or can be made: not a file, nor a path below one."""
    if not value.strip():
        raise UserError(f"{key} is empty; set it to a directory, e.g. {key}=clmerge-runs/store")
    path = Path(value)
    try:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
    except OSError:  # e.g. a folder that cannot be searched: the command that writes there reports it
        return
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies below the file {existing}"
        raise UserError(f"{key}={value} {where}, not a directory; set {key} to a directory")


def _check_names(cfg: Config) -> None:
    if cfg.benchmark.dataset == "world" and cfg.benchmark.world.domain not in DOMAINS:
        raise UserError(f"unknown benchmark.world.domain {cfg.benchmark.world.domain!r}; valid: {', '.join(DOMAINS)}")
    if not NAME.fullmatch(cfg.benchmark.name):
        raise UserError(f"benchmark.name {cfg.benchmark.name!r} may hold only letters, digits, '.', '_', '+' and '-' "
                        "(at most 100, starting with a letter or digit); rename it")
    for method in {cfg.merge.method, *cfg.eval.methods}:
        get_method(method)  # an unknown method is a mistake in any command, also where it is not used
    if not MODEL_NAME.fullmatch(cfg.model.name) or ".." in cfg.model.name:
        raise UserError(f"model.name {cfg.model.name!r} is not an open_clip model name; use one such as ViT-B-16 "
                        "(letters, digits, '.', '_', '+', '-', ':' and '/')")


def _at_least(key: str, value: int, least: int) -> None:
    if value < least:
        raise UserError(f"{key} must be at least {least}, got {value}")


def _check_counts(cfg: Config) -> None:
    world = cfg.benchmark.world
    _at_least("benchmark.world.train_per_class", world.train_per_class, 1)
    _at_least("benchmark.world.test_per_class", world.test_per_class, 1)
    _at_least("benchmark.world.val_per_class", world.val_per_class, 0)
    if not 0.0 <= cfg.benchmark.val_fraction < 1.0:
        raise UserError(f"benchmark.val_fraction={cfg.benchmark.val_fraction} is not valid; use a share in [0, 1), "
                        "e.g. 0.1")
    if cfg.benchmark.dataset == "world" and cfg.benchmark.val_fraction > 0:
        raise UserError("benchmark.val_fraction holds real training images out; the world renders its own "
                        "validation images: set benchmark.world.val_per_class=N instead")
    _at_least("eval.batch_size", cfg.eval.batch_size, 1)
    _at_least("eval.num_workers", cfg.eval.num_workers, 0)
    _at_least("finetune.num_workers", cfg.finetune.num_workers, 0)
    _at_least("finetune.warmup_steps", cfg.finetune.warmup_steps, 0)
    _at_least("threads", cfg.threads, 0)
    recipe = cfg.finetune
    _at_least("finetune.batch_size", recipe.batch_size, 1)
    for key, value in (("finetune.steps", recipe.steps), ("finetune.epochs", recipe.epochs),
                       ("benchmark.epochs", cfg.benchmark.epochs), *(
                           (f"benchmark.dataset_epochs.{name}", epochs)
                           for name, epochs in cfg.benchmark.dataset_epochs.items())):
        if value is not None:  # null: unset (epochs are ignored when steps are set, but never negative)
            _at_least(key, value, 1)


def _check_recipe_values(cfg: Config) -> None:
    recipe = cfg.finetune
    if recipe.regime not in REGIMES:
        raise UserError(f"unknown finetune.regime '{recipe.regime}'; valid: {', '.join(REGIMES)}")
    if recipe.precision not in PRECISIONS:
        raise UserError(f"unknown finetune.precision '{recipe.precision}'; valid: {', '.join(PRECISIONS)}")
    if not DEVICE.fullmatch(recipe.device):
        raise UserError(f"finetune.device must be auto, cpu, mps, cuda or cuda:N, got {recipe.device!r}")
    if len(recipe.betas) != 2 or not all(0 <= beta < 1 for beta in recipe.betas):
        raise UserError(f"finetune.betas must be two numbers in [0, 1), e.g. [0.9,0.999], got {recipe.betas}")
    if not recipe.eps > 0:
        raise UserError(f"finetune.eps must be positive, got {recipe.eps}")
    if not 0 <= recipe.weight_decay < math.inf:
        raise UserError(f"finetune.weight_decay must be a number >= 0, got {recipe.weight_decay}")
    if not math.isfinite(recipe.lr):
        raise UserError(f"finetune.lr must be a finite number, got {recipe.lr}")
