"""Load an open_clip model, its tokenizer and transforms from a `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from clmerge.config import ModelConfig
from clmerge.errors import UserError

BUILTIN_MODEL = "world-tiny"


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


def _resolve_pretrained(cfg: ModelConfig) -> str | None:
    if cfg.pretrained == "builtin":
        if cfg.name != BUILTIN_MODEL:
            raise UserError(f"model.pretrained=builtin exists only for model.name={BUILTIN_MODEL}; "
                            f"pass a weights file with model.pretrained=/path/to/weights.safetensors")
        if not builtin_weights().exists():
            raise UserError(f"the built-in weights {builtin_weights()} are missing; reinstall clmerge or "
                            f"regenerate them with `clmerge pretrain output={builtin_weights()}`")
        return str(builtin_weights())
    if cfg.pretrained in ("", "none", "random"):
        return None
    local = cfg.pretrained.removeprefix("local-dir:")
    looks_like_path = cfg.pretrained.startswith("local-dir:") or "/" in local or Path(local).suffix
    if looks_like_path and not Path(local).exists():
        raise UserError(f"model.pretrained file {local} does not exist; pass an existing .safetensors/.pt file")
    return cfg.pretrained


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", init_seed: int = 0) -> LoadedModel:
    """Build `cfg.name` with open_clip and load its pretrained weights.

    With `pretrained=none` the random initialisation is drawn from `init_seed`, so it is reproducible.
    """
    register_builtin_configs()
    if cfg.name not in open_clip.list_models():
        raise UserError(f"unknown model '{cfg.name}'; use an open_clip model name such as ViT-B-16, "
                        f"or {BUILTIN_MODEL}")
    pretrained = _resolve_pretrained(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            cfg.name, pretrained=pretrained, device=device, force_quick_gelu=cfg.force_quick_gelu)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    return LoadedModel(model=model, tokenizer=tokenizer, train_transform=train_tf, eval_transform=eval_tf)
