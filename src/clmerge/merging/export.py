"""Export a merged model as a full open_clip checkpoint (safetensors) that open_clip loads directly."""

from __future__ import annotations

from pathlib import Path

import torch

from clmerge.errors import UserError
from clmerge.models.loading import LoadedModel
from clmerge.models.tower import load_tower
from clmerge.store import atomic_save_tensors

Tensors = dict[str, torch.Tensor]


def export_checkpoint(loaded: LoadedModel, base: Tensors, merged: Tensors, alpha: float, path: Path,
                      metadata: dict[str, str]) -> Path:
    """Write the whole state dict of theta_0 + alpha * merged (trained tower; the rest is theta_0's).

    Load it with `open_clip.create_model(name, pretrained=str(path))`.
    """
    if path.suffix != ".safetensors":
        raise UserError(f"--export {path}: the checkpoint is written as safetensors; name it *.safetensors")
    if not path.parent.is_dir():
        raise UserError(f"--export {path}: the folder {path.parent} does not exist; create it first")
    load_tower(loaded.model, base, merged, scale=alpha)
    state = {name: tensor.detach().to("cpu").clone() for name, tensor in loaded.model.state_dict().items()}
    atomic_save_tensors(path, state, metadata={key: str(value) for key, value in metadata.items()})
    return path
