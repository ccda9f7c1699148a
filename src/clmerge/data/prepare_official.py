"""`data prepare` for datasets whose official distribution carries its split in annotation files:
CUB-200-2011 (train_test_split.txt), Stanford Cars (devkit .mat annotations), DomainNet (per-domain
lists), GTSRB (class folders and GT-final_test.csv), SUN397 (Partitions/*_01.txt), DTD (labels/*1.txt)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from clmerge.data.filelist import Entry
from clmerge.data.prepare_folders import Splits, class_dirs, label_of, list_images
from clmerge.errors import UserError

Prepared = tuple[Path, list[str], Splits, str]  # image root, raw classes, splits, how the split was made


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} is missing: {what}")
    return path


def _rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def prepare_cub(src: Path) -> Prepared:
    """CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/."""
    root = src / "CUB_200_2011" if (src / "CUB_200_2011").is_dir() else src
    what = "pass the extracted CUB_200_2011/ folder"
    classes = [name for _, name in _rows(_need(root / "classes.txt", what))]
    paths = dict(_rows(_need(root / "images.txt", what)))
    labels = {i: int(c) - 1 for i, c in _rows(_need(root / "image_class_labels.txt", what))}
    splits: Splits = {"train": [], "test": []}
    for image_id, is_train in _rows(_need(root / "train_test_split.txt", what)):
        entry = Entry(f"images/{paths[image_id]}", labels[image_id])
        splits["train" if is_train == "1" else "test"].append(entry)
    return root, classes, splits, "official train_test_split.txt"


def _mat_annotations(path: Path) -> list[tuple[str, int]]:
    from scipy.io import loadmat

    annotations = loadmat(path)["annotations"][0]
    return [(str(a["fname"][0]), int(a["class"][0][0])) for a in annotations]


def prepare_cars(src: Path) -> Prepared:
    """stanford_cars/: devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat, images."""
    from scipy.io import loadmat

    what = "pass the stanford_cars/ folder with the devkit and cars_test_annos_withlabels.mat"
    meta = loadmat(_need(src / "devkit" / "cars_meta.mat", what))
    classes = [str(name[0]) for name in meta["class_names"][0]]
    test_annos = next((p for p in (src / "cars_test_annos_withlabels.mat",
                                   src / "devkit" / "cars_test_annos_withlabels.mat") if p.is_file()),
                      src / "cars_test_annos_withlabels.mat")
    splits: Splits = {}
    for split, annos, folder in (("train", src / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 ("test", test_annos, "cars_test")):
        _need(src / folder, what)
        splits[split] = [Entry(f"{folder}/{name}", label - 1) for name, label in _mat_annotations(_need(annos, what))]
    return src, classes, splits, "devkit annotations (label = class - 1)"


def prepare_domainnet(src: Path, classes: Sequence[str], domains: Sequence[str]) -> Prepared:
    """<domain>_{train,test}.txt lists of `<domain>/<class>/<file> <label>`; labels = sorted class folders."""
    splits: Splits = {"train": [], "test": []}
    for domain in domains:
        for split in splits:
            listing = _need(src / f"{domain}_{split}.txt", "DomainNet needs the official per-domain lists")
            for row in _rows(listing):
                parts = row[0].split("/")
                if len(parts) != 3 or parts[0] != domain:
                    raise UserError(f"unexpected line '{row[0]}' in {listing}; expected <domain>/<class>/<file>")
                splits[split].append(Entry(row[0], label_of(parts[1], classes, src / domain), domain))
    return src, list(classes), splits, "official per-domain lists"


def prepare_gtsrb(src: Path, classes: Sequence[str]) -> Prepared:
    """Training class folders 000NN/ and the test images labelled by GT-final_test.csv."""
    base = src / "GTSRB" if (src / "GTSRB").is_dir() else src
    train = next((p for p in (base / "Final_Training" / "Images", base / "Training") if p.is_dir()), None)
    if train is None:
        raise UserError(f"no GTSRB training images under {base} (Final_Training/Images/ or Training/)")
    entries = [Entry(p.relative_to(src).as_posix(), label_of(d.name, classes, train))
               for d in class_dirs(train) for p in list_images(d)]
    test = _need(base / "Final_Test" / "Images", "pass the folder holding GTSRB/Final_Test/Images")
    gt = next((p for p in (src / "GT-final_test.csv", base / "GT-final_test.csv", test / "GT-final_test.csv")
               if p.is_file()), None)
    if gt is None:
        raise UserError(f"GT-final_test.csv (from GTSRB_Final_Test_GT.zip) is missing next to {base}")
    with open(gt, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter=";", skipinitialspace=True))
    tests = [Entry((test / row["Filename"]).relative_to(src).as_posix(), int(row["ClassId"])) for row in rows]
    return src, list(classes), {"train": entries, "test": tests}, "official training folders and GT-final_test.csv"


def prepare_sun397(src: Path) -> Prepared:
    """ClassName.txt and Partitions/Training_01.txt, Testing_01.txt; folder '/a/abbey' is class 'a_abbey'."""
    what = "pass the SUN397 folder with ClassName.txt and Partitions/ (from Partitions.zip)"
    names = [line.strip() for line in _need(src / "ClassName.txt", what).read_text().splitlines() if line.strip()]
    classes = sorted(name.strip("/").replace("/", "_") for name in names)
    parts = src / "Partitions" if (src / "Partitions").is_dir() else src
    splits: Splits = {}
    for split, listing in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        splits[split] = []
        for line in _need(parts / listing, what).read_text().split():
            folder = line.strip("/").rsplit("/", 1)[0].replace("/", "_")
            splits[split].append(Entry(line.strip("/"), label_of(folder, classes, src)))
    return src, classes, splits, "official partition 01"


def prepare_dtd(src: Path) -> Prepared:
    """images/<class>/ and labels/{train1,val1,test1}.txt: train = train1 + val1, test = test1."""
    root = src / "dtd" if (src / "dtd" / "images").is_dir() else src
    what = "pass the extracted dtd/ folder (images/ and labels/)"
    classes = [d.name for d in class_dirs(_need(root / "images", what))]
    splits: Splits = {"train": [], "test": []}
    for split, listings in (("train", ("train1.txt", "val1.txt")), ("test", ("test1.txt",))):
        for listing in listings:
            for line in _need(root / "labels" / listing, what).read_text().split():
                splits[split].append(Entry(f"images/{line}", label_of(line.split("/")[0], classes, root)))
    return root, classes, splits, "official split 1 (train = train1 + val1, test = test1)"
