"""`data prepare` for datasets distributed as class folders: ImageNet-R, EuroSAT, RESISC45 (and the
already-split `{train,test}/<class>/` layouts of the reference).

Without an official split, the split is a seeded permutation of the sorted file list: numpy's PCG64
seeded with `--seed`, the last round(test_fraction * N) files of the permutation form the test split.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from clmerge.data.catalog import DatasetSpec
from clmerge.data.filelist import Entry
from clmerge.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
Splits = dict[str, list[Entry]]


def list_images(folder: Path) -> list[Path]:
    """Every image file below `folder`, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_dirs(folder: Path) -> list[Path]:
    """The sub-folders of `folder`, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)


def seeded_split(entries: Sequence[Entry], seed: int, test_fraction: float) -> Splits:
    """Deterministic train/test split of `entries` (taken in sorted path order)."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    ordered = sorted(entries, key=lambda e: e.path)
    permutation = np.random.Generator(np.random.PCG64(seed)).permutation(len(ordered))
    num_test = round(test_fraction * len(ordered))
    cut = len(ordered) - num_test
    return {"train": [ordered[i] for i in permutation[:cut]], "test": [ordered[i] for i in permutation[cut:]]}


def label_of(name: str, classes: Sequence[str], where: Path) -> int:
    """Index of class folder `name` in the fixed class list."""
    try:
        return list(classes).index(name)
    except ValueError:
        raise UserError(f"unexpected class folder {where / name}: not one of the dataset's classes "
                        f"(e.g. {', '.join(list(classes)[:3])}); point --src at the dataset's own folder") from None


def folder_entries(folder: Path, base: Path, classes: Optional[Sequence[str]], domains: Sequence[str] = (),
                   names: Optional[dict[str, str]] = None) -> tuple[list[str], list[Entry]]:
    """Entries of `folder/<class>/**` with paths relative to `base`; classes fixed or the sorted folders.

    `names` maps folder names to class names (ImageNet-R's WordNet ids); `domains` are file-name prefixes.
    """
    dirs = class_dirs(folder)
    found = [(names or {}).get(d.name, d.name) for d in dirs]
    classes = list(classes) if classes is not None else sorted(found)
    entries = []
    for directory, name in zip(dirs, found):
        label = label_of(name, classes, folder)
        for path in list_images(directory):
            entries.append(Entry(path.relative_to(base).as_posix(), label, _domain(path, domains)))
    return classes, entries


def _domain(path: Path, domains: Sequence[str]) -> str:
    if not domains:
        return ""
    matches = [d for d in domains if path.name.startswith(d)]
    if not matches:
        raise UserError(f"cannot tell the domain of {path}: its name starts with none of {', '.join(domains)}")
    return max(matches, key=len)


def split_dirs(src: Path) -> dict[str, Path]:
    """The split folders of an already-split layout: train and test (or val, when there is no test)."""
    found = {name: src / name for name in ("train", "val", "test") if (src / name).is_dir()}
    if "train" not in found or not ({"test", "val"} & set(found)):
        return {}
    if "test" not in found:
        found["test"] = found.pop("val")
    return found


def prepare_class_folders(spec: DatasetSpec, src: Path, seed: int, test_fraction: float,
                          classes: Optional[Sequence[str]] = None, names: Optional[dict[str, str]] = None,
                          domains: Sequence[str] = ()) -> tuple[list[str], Splits, str]:
    """Class folders, already split into train/test (kept as they are) or not (seeded split)."""
    splits = split_dirs(src)
    if splits:
        result: Splits = {}
        found: set[str] = set()
        for split, folder in splits.items():
            split_classes, result[split] = folder_entries(folder, src, classes, domains, names)
            found.update(split_classes)
        final = list(classes) if classes is not None else sorted(found)
        if classes is None:  # labels were per split: recompute against the union
            result = {s: folder_entries(f, src, final, domains, names)[1] for s, f in splits.items()}
        return final, result, f"existing split folders {', '.join(f'{s}={p.name}' for s, p in splits.items())}"
    if not class_dirs(src):
        raise UserError(f"{src} holds no class folders; pass the folder of {spec.source}")
    final, entries = folder_entries(src, src, classes, domains, names)
    return final, seeded_split(entries, seed, test_fraction), f"seeded split, seed {seed}, test {test_fraction}"


def imagenet_r_names(src: Path) -> dict[str, str]:
    """WordNet id -> class folder name, from the dataset's README.txt (needed when folders are wnids)."""
    if not any(re.fullmatch(r"n\d{8}", d.name) for d in class_dirs(src)):
        return {}
    readme = src / "README.txt"
    if not readme.is_file():
        raise UserError(f"{src} has WordNet-id folders but no README.txt to name them; pass the extracted "
                        "imagenet-r/ folder as distributed")
    pairs = (re.match(r"^(n\d{8})\s+(.+?)\s*$", line) for line in readme.read_text().splitlines())
    return {m.group(1): m.group(2).replace(" ", "_") for m in pairs if m}


def eurosat_root(src: Path) -> Path:
    """EuroSAT's RGB zip extracts to 2750/ (or EuroSAT/2750, EuroSAT_RGB/): the folder with the classes."""
    for candidate in (src / "2750", src / "EuroSAT" / "2750", src / "EuroSAT_RGB"):
        if candidate.is_dir():
            return candidate
    return src
