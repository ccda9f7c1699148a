"""Load the class names and the per-task image splits of a prepared real dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from clmerge.data.arrays import load_arrays, read_cifar_pickle
from clmerge.data.catalog import spec
from clmerge.data.filelist import missing_layout, read_filelist
from clmerge.data.images import ImageArrays, ImageFiles, Transform, readable_entries


def raw_classes(name: str, data_root: Path) -> tuple[str, ...]:
    """The raw class labels of a dataset in label order (fixed ones need no data)."""
    info = spec(name)
    if info.classes is not None:
        return info.classes
    if info.storage == "files":
        return read_filelist(info, data_root).classes
    meta = Path(data_root) / info.directory / "meta"
    if not meta.is_file():
        raise missing_layout(info, data_root, f"{meta} is missing")
    return tuple(read_cifar_pickle(meta)["fine_label_names"])


def classnames(name: str, data_root: Path) -> tuple[str, ...]:
    """The prompt names of a dataset's classes, in label order (SPEC.md 4.6)."""
    return tuple(spec(name).classnames(raw_classes(name, data_root)))


def load_split(name: str, data_root: Path, split: str, transform: Transform, classes: Optional[Sequence[int]] = None,
               domain: Optional[str] = None, label_offset: int = 0, skip_corrupt: bool = False) -> Dataset:
    """The images of `split` whose label is in `classes` (all when None) and, if given, of `domain`.

    Labels are `label_offset + label`; images go through `transform`.
    """
    info = spec(name)
    wanted = None if classes is None else set(classes)
    if info.storage == "files":
        listing = read_filelist(info, data_root)
        entries = [e for e in listing.entries(split)
                   if (wanted is None or e.label in wanted) and (domain is None or e.domain == domain)]
        if skip_corrupt:
            entries = readable_entries(listing.root, entries)
        return ImageFiles(listing.root, entries, transform, label_offset)
    images, labels, _ = load_arrays(info, data_root, split)
    if wanted is not None:
        keep = np.isin(labels, sorted(wanted))
        images, labels = images[keep], labels[keep]
    return ImageArrays(images, labels.tolist(), transform, label_offset)
