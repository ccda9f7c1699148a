"""Task-vector sources the engine reads tensor by tensor: safetensors files, or vectors in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from clmerge.merging.layout import Piece
from clmerge.merging.reader import Entry, TensorFile

Tensors = dict[str, torch.Tensor]


class MemoryVector:
    """A vector already in memory, read like a file (for tests and callers that hold tensors)."""

    def __init__(self, tensors: Tensors, label: str = "<memory>"):
        self.path = Path(label)
        self.tensors = tensors
        self.entries = {name: Entry(t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                        for name, t in tensors.items()}

    def read_into(self, name: str, out: torch.Tensor, start: int = 0, count: int = -1) -> torch.Tensor:
        flat = self.tensors[name].reshape(-1)
        count = flat.numel() - start if count < 0 else count
        view = out.view(-1)[:count]
        view.copy_(flat[start:start + count])
        return view if (start, count) != (0, flat.numel()) else view.view(self.tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()

    def read_span(self, pieces: list[Piece], out: torch.Tensor) -> None:
        """Tensor pieces into the flat fp32 `out`, each at its offset."""
        for piece in pieces:
            out[piece.offset:piece.offset + piece.count].copy_(
                self.tensors[piece.name].reshape(-1)[piece.start:piece.start + piece.count])

    def span(self, pieces: list[Piece], out: torch.Tensor, hold: int) -> torch.Tensor:
        """The pieces copied into the flat fp32 `out`, and `out` (`hold`: as for files; nothing is mapped)."""
        self.read_span(pieces, out)
        return out

    def release(self) -> None:
        """Nothing is mapped."""

    def close(self) -> None:
        """Nothing to release."""


Source = Union[TensorFile, MemoryVector]


def open_sources(items: list[Union[Path, str, Tensors]]) -> list[Source]:
    """Files (paths) or in-memory vectors (dicts) as sources."""
    return [MemoryVector(item, f"<task vector {i + 1}>") if isinstance(item, dict) else TensorFile(item)
            for i, item in enumerate(items)]
