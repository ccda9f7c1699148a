"""Tiny fake copies of every real dataset, each written in its official distribution format.

A few images per class in a few classes; the class lists are complete where the format carries them
(CUB's classes.txt, Cars' meta, CIFAR's meta, SUN397's ClassName.txt, folders of RESISC45 and DTD), so
the prepared data has the real label space. `FAKES[name](dir)` writes one and returns its `--src` and
the expected (train, test) image counts, or None where the split is seeded.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from clmerge.data import reference
from clmerge.data.catalog import EUROSAT_FOLDERS

Fake = tuple[Path, Optional[tuple[int, int]]]
CUB_ORDER = reference.class_order("CUB200") or []


def image(path: Path, label: int, index: int, fmt: Optional[str] = None) -> None:
    """A 12x10 image whose colour depends on the label (learnable) plus noise."""
    rng = np.random.default_rng(label * 1000 + index)
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.int64)
    pixels = np.clip(base + rng.integers(-20, 20, size=(10, 12, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def write_cifar100(root: Path) -> Fake:
    """cifar-100-python.tar.gz: train/test/meta pickles; one train and one test image per class."""
    rng = np.random.default_rng(0)
    members = {"meta": {"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                        "coarse_label_names": [f"coarse_{i}" for i in range(20)]}}
    for split in ("train", "test"):
        labels = list(range(100))
        members[split] = {"data": rng.integers(0, 256, size=(100, 3072), dtype=np.uint8), "fine_labels": labels,
                          "coarse_labels": [i // 5 for i in labels], "filenames": [f"{i}.png" for i in labels]}
    archive = root / "cifar-100-python.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in members.items():
            data = pickle.dumps(payload, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive, (100, 100)


IMAGENET_R_CLASSES = [CUB_ORDER[i] for i in (0, 1, 100, 101)]  # two per half of the reference order (= CUB's)
IMAGENET_R_DOMAINS = ("tattoo", "sketch", "art")


def write_imagenet_r(root: Path) -> Fake:
    """imagenet-r/<wnid>/<domain>_<n>.jpg and README.txt; 4 classes x 3 domains x 6 images."""
    names = reference.class_folders("ImageNetR") or ()
    src = root / "imagenet-r"
    readme = ["ImageNet-R: 200 classes", ""]
    for rank, label in enumerate(IMAGENET_R_CLASSES):
        wnid = f"n{rank + 1:08d}"
        readme.append(f"{wnid} {names[label]}")
        for domain in IMAGENET_R_DOMAINS:
            for i in range(6):
                image(src / wnid / f"{domain}_{i}.jpg", label, i)
    (src / "README.txt").write_text("\n".join(readme) + "\n")
    return src, None


def write_cub200(root: Path) -> Fake:
    """CUB_200_2011/ with its index files; 2 train and 2 test images in 4 classes."""
    src = root / "CUB_200_2011"
    classes = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(200)]
    (src / "images").mkdir(parents=True)
    (src / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    images, labels, split, image_id = [], [], [], 0
    for label in (CUB_ORDER[0], CUB_ORDER[1], CUB_ORDER[100], CUB_ORDER[101]):
        for i in range(4):
            image_id += 1
            path = f"{classes[label]}/{classes[label]}_{i}.jpg"
            image(src / "images" / path, label, i)
            images.append(f"{image_id} {path}\n")
            labels.append(f"{image_id} {label + 1}\n")
            split.append(f"{image_id} {1 if i < 2 else 0}\n")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split)):
        (src / name).write_text("".join(lines))
    return src, (8, 8)


def _annotations(path: Path, rows: list[tuple[str, int]]) -> None:
    from scipy.io import savemat

    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
              ("fname", "O")]
    table = np.zeros((1, len(rows)), dtype=fields)
    for i, (name, cls) in enumerate(rows):
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 9, 9)]
        table[0, i] = (*box, np.array([[cls]], dtype=np.uint8), np.array([name]))
    savemat(path, {"annotations": table})


def write_cars(root: Path) -> Fake:
    """stanford_cars/ with the devkit .mat files; 2 train and 2 test images in 4 classes."""
    from scipy.io import savemat

    src = root / "stanford_cars"
    (src / "devkit").mkdir(parents=True)
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Make_{i} Model {2000 + i % 13}" for i in range(196)]
    savemat(src / "devkit" / "cars_meta.mat", {"class_names": names})
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label in (0, 1, 100, 101):
        for split in rows:
            for i in range(2):
                name = f"{label:03d}{i}.jpg"
                image(src / f"cars_{split}" / name, label, i)
                rows[split].append((name, label + 1))
    _annotations(src / "devkit" / "cars_train_annos.mat", rows["train"])
    _annotations(src / "cars_test_annos_withlabels.mat", rows["test"])
    return src, (8, 8)


DOMAINNET_CLASSES = (0, 3, 200)  # The_Eiffel_Tower, aircraft_carrier, ...


def write_domainnet(root: Path) -> Fake:
    """<domain>/<class>/*.jpg with <domain>_{train,test}.txt for all 6 domains; 3 classes, 2 + 1 images."""
    names = reference.class_folders("DomainNet") or ()
    src = root / "DomainNet"
    for domain in reference.domains("DomainNet"):
        lists: dict[str, list[str]] = {"train": [], "test": []}
        for label in DOMAINNET_CLASSES:
            for i, split in enumerate(("train", "train", "test")):
                rel = f"{domain}/{names[label]}/{domain}_{label:03d}_{i}.jpg"
                image(src / rel, label, i)
                lists[split].append(f"{rel} {label}\n")  # the official label column (not used)
        for split, lines in lists.items():
            (src / f"{domain}_{split}.txt").write_text("".join(lines))
    return src, (36, 18)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path) -> Fake:
    """The four gzipped idx files; 20 train and 10 test 28x28 digits."""
    src = root / "mnist-download"
    src.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 20), ("t10k", 10)):
        labels = np.arange(n) % 10
        _idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return src, (20, 10)


def write_svhn(root: Path) -> Fake:
    """train_32x32.mat and test_32x32.mat (X [32, 32, 3, N], y [N, 1] with 10 for the digit 0)."""
    from scipy.io import savemat

    src = root / "svhn-download"
    src.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", 20), ("test", 10)):
        y = (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)
        savemat(src / f"{split}_32x32.mat", {"X": rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8), "y": y})
    return src, (20, 10)


def write_eurosat(root: Path) -> Fake:
    """EuroSAT RGB as distributed: 2750/<Class>/<Class>_<n>.jpg, 4 images per class."""
    src = root / "EuroSAT"
    for label, folder in enumerate(EUROSAT_FOLDERS):
        for i in range(4):
            image(src / "2750" / folder / f"{folder}_{i + 1}.jpg", label, i)
    return src, None


def write_gtsrb(root: Path) -> Fake:
    """GTSRB/Final_Training/Images/000NN/*.ppm, GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv."""
    src = root / "gtsrb-download"
    rows = []
    for label in (0, 1, 40, 42):
        for i in range(2):
            image(src / "GTSRB" / "Final_Training" / "Images" / f"{label:05d}" / f"00000_{i:05d}.ppm", label, i)
            name = f"{label:03d}{i:02d}.ppm"
            image(src / "GTSRB" / "Final_Test" / "Images" / name, label, i + 10)
            rows.append({"Filename": name, "Width": 12, "Height": 10, "Roi.X1": 1, "Roi.Y1": 1, "Roi.X2": 9,
                         "Roi.Y2": 9, "ClassId": label})
    with open(src / "GT-final_test.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    return src, (8, 8)


def write_resisc45(root: Path) -> Fake:
    """NWPU-RESISC45/<class>/<class>_<n>.jpg: 45 class folders, 4 images in the first and last 3."""
    src = root / "NWPU-RESISC45"
    for label in range(45):
        folder = src / f"scene_type_{label:02d}"
        folder.mkdir(parents=True)
        for i in range(4 if label < 3 or label > 41 else 0):
            image(folder / f"scene_type_{label:02d}_{i + 1:03d}.jpg", label, i)
    return src, None


def write_sun397(root: Path) -> Fake:
    """SUN397/ with ClassName.txt (397 classes, one nested) and Partitions/{Training,Testing}_01.txt."""
    src = root / "SUN397"
    classes = ["/b/bakery/shop"] + [f"/{chr(97 + i % 26)}/place_{i:03d}" for i in range(1, 397)]
    (src / "Partitions").mkdir(parents=True)
    (src / "ClassName.txt").write_text("\n".join(classes) + "\n")
    lists: dict[str, list[str]] = {"Training_01.txt": [], "Testing_01.txt": []}
    for label, name in enumerate(classes[:3] + classes[-2:]):
        for i, listing in enumerate(("Training_01.txt", "Training_01.txt", "Testing_01.txt")):
            rel = f"{name}/sun_{label:03d}{i}.jpg"
            image(src / rel.strip("/"), label, i)
            lists[listing].append(rel)
    for listing, lines in lists.items():
        (src / "Partitions" / listing).write_text("\n".join(lines) + "\n")
    return src, (10, 5)


def write_dtd(root: Path) -> Fake:
    """dtd/images/<class>/ for 47 classes (images in 3) and labels/{train1,val1,test1}.txt."""
    src = root / "dtd"
    lists: dict[str, list[str]] = {"train1.txt": [], "val1.txt": [], "test1.txt": []}
    for label in range(47):
        name = f"texture{label:02d}"
        (src / "images" / name).mkdir(parents=True)
        if label in (0, 1, 46):
            for i, listing in enumerate(lists):
                image(src / "images" / name / f"{name}_{i:04d}.jpg", label, i)
                lists[listing].append(f"{name}/{name}_{i:04d}.jpg")
    (src / "labels").mkdir()
    for listing, lines in lists.items():
        (src / "labels" / listing).write_text("\n".join(lines) + "\n")
    return src, (6, 3)


FAKES: dict[str, Callable[[Path], Fake]] = {
    "cifar100": write_cifar100, "imagenet_r": write_imagenet_r, "cub200": write_cub200, "cars": write_cars,
    "domainnet": write_domainnet, "mnist": write_mnist, "svhn": write_svhn, "eurosat": write_eurosat,
    "gtsrb": write_gtsrb, "resisc45": write_resisc45, "sun397": write_sun397, "dtd": write_dtd,
}
