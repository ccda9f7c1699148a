"""`clmerge data prepare NAME --src ... --dst ...`: official distribution -> the layout clmerge reads.

Array datasets (CIFAR-100, MNIST, SVHN) are copied or extracted into torchvision's layout under the data
root. Image-file datasets get a `clmerge.json` and file lists under `<dst>/<directory>`, pointing at the
images where they are: nothing of the user's is moved, renamed or written.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
from pathlib import Path

from clmerge.data import reference
from clmerge.data.arrays import CIFAR_FILES, MNIST_FILES, SVHN_FILES, load_arrays
from clmerge.data.catalog import DatasetSpec, spec
from clmerge.data.filelist import write_filelist
from clmerge.data.prepare_folders import eurosat_root, imagenet_r_names, prepare_class_folders
from clmerge.data.prepare_official import (prepare_cars, prepare_cub, prepare_domainnet, prepare_dtd,
                                           prepare_gtsrb, prepare_sun397)
from clmerge.errors import UserError


def prepare(name: str, src: Path, dst: Path, seed: int = 0, test_fraction: float = 0.2) -> Path:
    """Prepare dataset `name` from `src` under the data root `dst`; returns the dataset's directory."""
    info = spec(name)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise UserError(f"--src {src} does not exist; pass {info.source}")
    if info.storage != "files":
        return _prepare_arrays(info, src, dst)
    root, classes, splits, how = _files(info, src, seed, test_fraction)
    if len(classes) != info.num_classes:
        raise UserError(f"found {len(classes)} classes in {src}, {info.title} has {info.num_classes}; "
                        f"pass the complete dataset ({info.source})")
    for split, entries in splits.items():
        if not entries:
            raise UserError(f"the {split} split of {src} is empty; pass {info.source}")
        missing = next((e.path for e in entries if not (root / e.path).is_file()), None)
        if missing is not None:
            raise UserError(f"{root / missing} is listed in the {split} split but missing; "
                            "re-extract the dataset")
    return write_filelist(info, dst, root, classes, splits, f"{src.resolve()}: {how}")


def _files(info: DatasetSpec, src: Path, seed: int, fraction: float) -> tuple[Path, list[str], dict, str]:
    if info.name == "imagenet_r":
        return src, *prepare_class_folders(info, src, seed, fraction, info.classes, imagenet_r_names(src),
                                           info.domains())
    if info.name == "eurosat":
        root = eurosat_root(src)
        return root, *prepare_class_folders(info, root, seed, fraction, info.classes)
    if info.name == "resisc45":
        root = src / "NWPU-RESISC45" if (src / "NWPU-RESISC45").is_dir() else src
        return root, *prepare_class_folders(info, root, seed, fraction)
    if info.name in ("sun397", "dtd") and (src / "train").is_dir():
        return src, *prepare_class_folders(info, src, seed, fraction)
    official = {"cub200": lambda: prepare_cub(src), "cars": lambda: prepare_cars(src),
                "domainnet": lambda: prepare_domainnet(src, info.classes or (), reference.domains("DomainNet")),
                "gtsrb": lambda: prepare_gtsrb(src, info.classes or ()), "sun397": lambda: prepare_sun397(src),
                "dtd": lambda: prepare_dtd(src)}
    return official[info.name]()


def _find(src: Path, name: str, folders: tuple[str, ...]) -> Path:
    for folder in folders:
        for candidate in (src / folder / name, src / folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"{name} is not in {src}; pass a folder holding the official files")


def _prepare_arrays(info: DatasetSpec, src: Path, dst: Path) -> Path:
    target = dst / info.directory
    if info.storage == "cifar" and src.is_file():
        if not tarfile.is_tarfile(src):
            raise UserError(f"{src} is not a tar archive; pass cifar-100-python.tar.gz or its extracted folder")
        with tarfile.open(src) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("cifar-100-python/")]
            archive.extractall(dst, members=members, filter="data")
    else:
        files = {"cifar": CIFAR_FILES, "mnist": (*MNIST_FILES["train"], *MNIST_FILES["test"]),
                 "svhn": tuple(SVHN_FILES.values())}[info.storage]
        folders = {"cifar": (".", "cifar-100-python"), "mnist": (".", "raw", "MNIST/raw"),
                   "svhn": (".", "svhn")}[info.storage]
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            source = _find(src, name, folders)
            if (target / name).exists() and (target / name).samefile(source):
                continue
            opener = gzip.open if source.suffix == ".gz" else open
            with opener(source, "rb") as reader, open(target / f"{name}.part", "wb") as writer:
                shutil.copyfileobj(reader, writer)
            (target / f"{name}.part").replace(target / name)
    for split in ("train", "test"):
        load_arrays(info, dst, split)
    return target
