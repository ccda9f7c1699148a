"""Load an open_clip model, its tokenizer and transforms from a `ModelConfig`.

`model.pretrained` is one of: `builtin` (the shipped world-tiny weights), `none` (random init), an
open_clip tag (fetched by open_clip, or found in its cache), a local `.safetensors` or `.pt`/`.pth`/`.bin`
state dict (`.pt` read with `torch.load(weights_only=True)`, never unpickling objects), or
`local-dir:<dir>` (open_clip_config.json + open_clip_model.safetensors; `model.name` is then a label).
"""

from __future__ import annotations

import logging
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import open_clip
import torch

from clmerge.config import ModelConfig
from clmerge.errors import UserError

BUILTIN_MODEL = "world-tiny"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_WEIGHT_ERRORS = ("Failed to download", "state_dict", "weights_only", "Weights only", "TorchScript", "Unpickl")


def _assets() -> Path:
    return Path(str(resources.files("clmerge") / "assets"))


def builtin_weights() -> Path:
    """The shipped pretrained weights of the built-in world model."""
    return _assets() / "world_clip.safetensors"


def register_builtin_configs() -> None:
    """Make open_clip know the built-in model config(s) shipped with clmerge (idempotent)."""
    open_clip.add_model_config(_assets() / "model_configs")


@dataclass
class LoadedModel:
    """A CLIP model with what it needs to embed text and images."""

    model: open_clip.CLIP
    tokenizer: Callable[..., torch.Tensor]
    train_transform: Any
    eval_transform: Any


def _local_dir(value: str) -> str:
    folder = Path(value.removeprefix("local-dir:")).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise UserError(f"model.pretrained={value}: {folder} holds no open_clip_config.json; a local-dir: folder "
                        "needs open_clip_config.json (model_cfg, preprocess_cfg) and open_clip_model.safetensors")
    return f"local-dir:{folder}"


def _resolve(cfg: ModelConfig) -> tuple[str, Optional[str]]:
    """The open_clip model name and `pretrained` argument for `cfg`."""
    value = cfg.pretrained
    if value.startswith("local-dir:"):
        return _local_dir(value), None
    if cfg.name not in open_clip.list_models():
        raise UserError(f"unknown model '{cfg.name}'; use an open_clip model name such as ViT-B-16, "
                        f"or {BUILTIN_MODEL}")
    if value == "builtin":
        if cfg.name != BUILTIN_MODEL:
            raise UserError(f"model.pretrained=builtin exists only for model.name={BUILTIN_MODEL}; "
                            f"pass a weights file with model.pretrained=/path/to/weights.safetensors")
        if not builtin_weights().exists():
            raise UserError(f"the built-in weights {builtin_weights()} are missing; reinstall clmerge or "
                            f"regenerate them with `clmerge pretrain output={builtin_weights()}`")
        return cfg.name, str(builtin_weights())
    if value in ("", "none", "random"):
        return cfg.name, None
    path = Path(value).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or "/" in value:
        if not path.is_file():
            raise UserError(f"model.pretrained file {path} does not exist; pass an existing .safetensors/.pt file")
        return cfg.name, str(path)
    tags = open_clip.list_pretrained_tags_by_model(cfg.name)
    if value not in tags:
        raise UserError(f"'{value}' is not a pretrained tag of {cfg.name} (tags: {', '.join(tags) or 'none'}); "
                        "or pass a local file: model.pretrained=/path/to/weights.safetensors")
    return cfg.name, value


def _load_error(cfg: ModelConfig, err: Exception) -> UserError:
    """A one-line error for weights that cannot be fetched or read."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "Failed to download" in first:
        return UserError(f"cannot fetch the '{cfg.pretrained}' weights of {cfg.name} (offline, or the hub is "
                         f"unreachable); download them once on a connected machine, or pass a local file: "
                         f"model.pretrained=/path/to/{cfg.name}.safetensors (or a .pt state dict, or local-dir:<dir>)")
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err) or "TorchScript" in str(err):
        return UserError(f"{cfg.pretrained} is not a plain state dict: .pt files are read with weights_only=True "
                         "and never unpickled; save the model's state_dict() (or .safetensors) and pass that")
    return UserError(f"cannot load model.pretrained={cfg.pretrained} into {cfg.name}: {first[:300]}; "
                     "check that the weights match model.name")


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's log while it builds a model: it warns about random init (we load weights after, or
    want none) and logs a failed download before raising (we say that in one line)."""
    quiet = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(quiet)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", init_seed: int = 0) -> LoadedModel:
    """Build `cfg.name` with open_clip and load its pretrained weights.

    With `pretrained=none` the random initialisation is drawn from `init_seed`, so it is reproducible.
    """
    register_builtin_configs()
    name, pretrained = _resolve(cfg)
    try:
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, force_quick_gelu=cfg.force_quick_gelu)
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as err:
        if isinstance(err, RuntimeError) and not any(key in str(err) for key in _WEIGHT_ERRORS):
            raise  # not about the weights (e.g. out of memory)
        raise _load_error(cfg, err) from None
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(model=model, tokenizer=tokenizer, train_transform=train_tf, eval_transform=eval_tf)


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model's architecture on the meta device (no weights, no memory): for shape checks."""
    register_builtin_configs()
    with _quiet_open_clip(), torch.device("meta"):
        return open_clip.create_model(cfg.name, pretrained=None, device="meta", force_quick_gelu=cfg.force_quick_gelu)
