"""Export a merged model as a full open_clip checkpoint (safetensors) that open_clip loads directly."""

from __future__ import annotations

from pathlib import Path

import torch

from clmerge.errors import UserError
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower
from clmerge.store import atomic_save_tensors

Tensors = dict[str, torch.Tensor]


def check_export_path(path: Path, store: Path) -> None:
    """A path --export may write: a *.safetensors file (an existing one is replaced) in an existing folder,
    never a folder and never inside the checkpoint store, whose checkpoints it could overwrite."""
    if path.suffix != ".safetensors":
        raise UserError(f"--export {path}: the checkpoint is written as safetensors; name it *.safetensors")
    if path.resolve().is_relative_to(store.resolve()):
        raise UserError(f"--export {path} is inside the checkpoint store {store} (paths.store), where it could "
                        "overwrite a checkpoint; export to a path outside it")
    if path.is_dir():
        raise UserError(f"--export {path} is a folder; name a file in it, e.g. --export {path / 'merged.safetensors'}")
    if not path.parent.is_dir():
        raise UserError(f"--export {path}: the folder {path.parent} does not exist; create it first")


def export_checkpoint(loaded: LoadedModel, base: Tensors, merged: Tensors, alpha: float, path: Path,
                      metadata: dict[str, str]) -> Path:
    """Write the whole state dict of theta_0 + alpha * merged (trained tower; the rest is theta_0's) to a path
    `check_export_path` accepted.

    Load it with `open_clip.create_model(name, pretrained=str(path))`.
    """
    load_tower(loaded.model, base, merged, scale=alpha)
    state = {name: tensor.detach().to("cpu").clone() for name, tensor in loaded.model.state_dict().items()}
    atomic_save_tensors(path, state, metadata={key: str(value) for key, value in metadata.items()})
    return path
