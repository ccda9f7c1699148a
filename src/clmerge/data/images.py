"""Datasets of real images: decoded with PIL, converted to RGB and passed through the model's transform.

Training uses the open_clip train transform and every evaluation the eval transform (SPEC.md 4.5); the
caller passes the one it needs. A corrupt image is an error naming its path, unless the user asked to
skip unreadable images (`benchmark.skip_corrupt=true`), which drops them, with a warning, up front.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from clmerge.data.filelist import Entry
from clmerge.errors import UserError

Transform = Callable[[Image.Image], Any]
log = logging.getLogger(__name__)


def open_rgb(path: Path) -> Image.Image:
    """The image at `path` as RGB; a corrupt or missing file is a one-line UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); replace or remove it, or "
                        "set benchmark.skip_corrupt=true to skip unreadable images") from None


def readable_entries(root: Path, entries: Sequence[Entry]) -> list[Entry]:
    """The entries whose image decodes; logs a warning naming the unreadable ones."""
    kept, bad = [], []
    for entry in entries:
        try:
            open_rgb(root / entry.path)
            kept.append(entry)
        except UserError:
            bad.append(entry.path)
    if bad:
        log.warning("skipped %d unreadable image(s) under %s: %s", len(bad), root, ", ".join(bad[:5]))
    return kept


class ImageFiles(Dataset):
    """Image files under `root` with labels `label_offset + entry.label`."""

    def __init__(self, root: Path, entries: Sequence[Entry], transform: Transform, label_offset: int = 0):
        self.root, self.entries, self.transform = Path(root), list(entries), transform
        self.labels = [label_offset + e.label for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(open_rgb(self.root / self.entries[index].path)), self.labels[index]


class ImageArrays(Dataset):
    """In-memory uint8 images ([N, H, W] grey or [N, H, W, 3]) with labels `label_offset + label`."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Transform, label_offset: int = 0):
        self.images, self.transform = images, transform
        self.labels = [label_offset + int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[index]).convert("RGB")), self.labels[index]

