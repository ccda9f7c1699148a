"""The prepared layout of image-file datasets: ``clmerge.json`` and one file list per split.

    <data root>/<directory>/clmerge.json   {"format", "dataset", "root", "classes", "splits", "source"}
    <data root>/<directory>/train.tsv      <image path relative to root> TAB <label> TAB <domain or empty>
    <data root>/<directory>/test.tsv

`root` is where the images are (the `--src` of `clmerge data prepare`, stored absolute, or relative to
this directory); prepare never moves, renames or writes the user's images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clmerge.data.catalog import DatasetSpec
from clmerge.errors import UserError

MANIFEST = "clmerge.json"
FORMAT = 1


@dataclass(frozen=True)
class Entry:
    """One image: path relative to the image root, label index, domain ('' when the dataset has none)."""

    path: str
    label: int
    domain: str = ""


@dataclass(frozen=True)
class FileList:
    """A prepared image-file dataset."""

    directory: Path
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, str]  # split name -> list file name

    def entries(self, split: str) -> list[Entry]:
        """The images of `split`, in list order."""
        if split not in self.splits:
            raise UserError(f"{self.directory / MANIFEST} has no '{split}' split (it has "
                            f"{', '.join(self.splits)}); rerun `clmerge data prepare`")
        entries = []
        for line in (self.directory / self.splits[split]).read_text().splitlines():
            path, label, domain = (line.split("\t") + [""])[:3]
            entries.append(Entry(path, int(label), domain))
        return entries


def missing_layout(spec: DatasetSpec, root: Path, problem: str) -> UserError:
    """The one-line error for a missing or mis-arranged dataset directory."""
    return UserError(f"{problem}: expected {Path(root) / spec.layout}; make it with `clmerge data prepare "
                     f"{spec.name} --src <{spec.source}> --dst {root}` (see docs/benchmarks.md)")


def write_filelist(spec: DatasetSpec, data_root: Path, image_root: Path, classes: Sequence[str],
                   splits: dict[str, list[Entry]], source: str) -> Path:
    """Write the prepared layout of `spec` under `data_root`; returns its directory."""
    directory = Path(data_root) / spec.directory
    directory.mkdir(parents=True, exist_ok=True)
    image_root = image_root.resolve()
    root = (os.path.relpath(image_root, directory.resolve())
            if image_root.is_relative_to(directory.resolve()) else str(image_root))
    names = {}
    for split, entries in splits.items():
        names[split] = f"{split}.tsv"
        lines = "".join(f"{e.path}\t{e.label}\t{e.domain}\n" for e in sorted(entries, key=lambda e: e.path))
        (directory / names[split]).write_text(lines)
    manifest = {"format": FORMAT, "dataset": spec.name, "root": root, "classes": list(classes),
                "splits": names, "source": source}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return directory


def read_filelist(spec: DatasetSpec, data_root: Path) -> FileList:
    """Read and validate the prepared layout of `spec` under `data_root`."""
    directory = Path(data_root) / spec.directory
    path = directory / MANIFEST
    if not path.is_file():
        raise missing_layout(spec, data_root, f"no prepared {spec.title} at {directory}")
    try:
        manifest = json.loads(path.read_text())
        root, classes, splits = manifest["root"], manifest["classes"], manifest["splits"]
    except (ValueError, KeyError) as err:
        raise missing_layout(spec, data_root, f"{path} is not a clmerge dataset manifest ({err})") from None
    if manifest.get("dataset") != spec.name:
        raise missing_layout(spec, data_root, f"{path} describes '{manifest.get('dataset')}', not {spec.name}")
    if len(classes) != spec.num_classes:
        raise missing_layout(spec, data_root, f"{path} lists {len(classes)} classes, {spec.title} has "
                                              f"{spec.num_classes}")
    for split, name in splits.items():
        if not (directory / name).is_file():
            raise missing_layout(spec, data_root, f"the {split} list {directory / name} is missing")
    image_root = directory / root
    if not image_root.is_dir():
        raise UserError(f"the images of {spec.title} are not at {image_root} (the 'root' of {path}); "
                        f"fix 'root' there or rerun `clmerge data prepare {spec.name}`")
    return FileList(directory, image_root, tuple(classes), dict(splits))
