"""Export a merged model as a full open_clip checkpoint (safetensors) that open_clip loads directly."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from clmerge.errors import UserError
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower
from clmerge.store import atomic_save_tensors

Tensors = dict[str, torch.Tensor]


STORE_PARTS = ("finetune", "merge", "heads")  # the folders of a checkpoint store that hold its files


def check_export_path(path: Path, store: Path) -> None:
    """A path --export may write: a *.safetensors file (an existing one is replaced) in an existing folder this
    user can write to, never a folder and never among the store's own files, which it could overwrite."""
    if path.suffix != ".safetensors":
        raise UserError(f"--export {path}: the checkpoint is written as safetensors; name it *.safetensors")
    if any(path.resolve().is_relative_to((store / part).resolve()) for part in STORE_PARTS):
        raise UserError(f"--export {path} is inside the checkpoint store {store} (paths.store), where it could "
                        "overwrite a checkpoint; export to a path outside its finetune/, merge/ and heads/ folders")
    if path.is_dir():
        raise UserError(f"--export {path} is a folder; name a file in it, e.g. --export {path / 'merged.safetensors'}")
    if not path.parent.is_dir():
        raise UserError(f"--export {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"--export {path}: this user cannot write to the folder {path.parent}; export elsewhere")


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
