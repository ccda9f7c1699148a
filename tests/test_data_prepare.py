"""`clmerge data prepare` and `data check` on a fake copy of every dataset in its official format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from clmerge.data import reference
from clmerge.data.catalog import SPECS
from clmerge.data.check import check
from clmerge.data.filelist import read_filelist
from clmerge.data.prepare import prepare
from clmerge.data.real import classnames
from test_data_fakes import CUB_ORDER, FAKES, IMAGENET_R_CLASSES, IMAGENET_R_DOMAINS


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative path, size and bytes below `path` (or of the file itself)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(FAKES))
def test_prepare_then_check_counts_every_split(cli, tmp_path: Path, name: str) -> None:
    src, expected = FAKES[name](tmp_path / "downloads")
    before = tree_digest(src)
    result = cli("data", "prepare", name, "--src", str(src), "--dst", "data", "--test-fraction", "0.5")
    assert result.exit_code == 0, result.stderr
    assert f"clmerge data check {name}" in result.stdout
    assert tree_digest(src) == before  # the user's files are never moved, renamed or written
    rows = check(name, tmp_path / "data", decode=True)
    totals = {row.split: row.images for row in rows if not row.domain}
    assert totals["train"] > 0 and totals["test"] > 0
    if expected is not None:
        assert (totals["train"], totals["test"]) == expected
    shown = cli("data", "check", name, "--root", "data")
    assert shown.exit_code == 0 and "train" in shown.stdout and str(totals["test"]) in shown.stdout
    assert len(classnames(name, tmp_path / "data")) == SPECS[name].num_classes


def test_imagenet_r_split_is_seeded_complete_and_keeps_domains(tmp_path: Path) -> None:
    src, _ = FAKES["imagenet_r"](tmp_path)
    spec = SPECS["imagenet_r"]
    lists = {}
    for seed in (0, 0, 1):
        prepare("imagenet_r", src, tmp_path / f"data{seed}", seed=seed, test_fraction=0.25)
        listing = read_filelist(spec, tmp_path / f"data{seed}")
        lists.setdefault(seed, []).append({s: listing.entries(s) for s in ("train", "test")})
    first = lists[0][0]
    assert lists[0][1] == first and lists[1][0] != first
    paths = [e.path for split in first.values() for e in split]
    assert len(paths) == len(set(paths)) == 72 and len(first["test"]) == 18
    names = reference.class_folders("ImageNetR") or ()
    for entry in first["train"] + first["test"]:
        assert entry.label in IMAGENET_R_CLASSES  # labelled by the reference's sorted class names
        assert Path(entry.path).name.startswith(entry.domain) and entry.domain in IMAGENET_R_DOMAINS
    assert read_filelist(spec, tmp_path / "data0").classes == names
    domains = {row.domain for row in check("imagenet_r", tmp_path / "data0") if row.domain}
    assert domains == set(IMAGENET_R_DOMAINS)


def test_imagenet_r_existing_split_is_kept_as_is(tmp_path: Path) -> None:
    names = reference.class_folders("ImageNetR") or ()
    src = tmp_path / "imagenet-r"
    from test_data_fakes import image

    for split, count in (("train", 3), ("test", 2)):
        for i in range(count):
            image(src / split / names[5] / f"art_{split}{i}.jpg", 5, i)
    prepare("imagenet_r", src, tmp_path / "data")
    listing = read_filelist(SPECS["imagenet_r"], tmp_path / "data")
    assert [e.path for e in listing.entries("test")] == [f"test/{names[5]}/art_test{i}.jpg" for i in range(2)]
    assert json.loads((tmp_path / "data" / "imagenet-r" / "clmerge.json").read_text())["root"] == str(src.resolve())


def test_official_annotations_decide_the_splits(tmp_path: Path) -> None:
    for name in ("cub200", "cars", "domainnet", "dtd", "sun397", "gtsrb"):
        src, _ = FAKES[name](tmp_path / name)
        prepare(name, src, tmp_path / "data")
    data = tmp_path / "data"
    cub = read_filelist(SPECS["cub200"], data)
    assert {e.label for e in cub.entries("test")} == {CUB_ORDER[0], CUB_ORDER[1], CUB_ORDER[100], CUB_ORDER[101]}
    assert all(e.path.endswith(("_2.jpg", "_3.jpg")) for e in cub.entries("test"))  # train_test_split.txt
    assert classnames("cub200", data)[CUB_ORDER[0]] == f"Bird {CUB_ORDER[0] + 1}"
    cars = read_filelist(SPECS["cars"], data)
    assert sorted({e.label for e in cars.entries("train")}) == [0, 1, 100, 101]  # class - 1
    assert all(e.path.startswith(f"cars_train/{e.label:03d}") for e in cars.entries("train"))
    assert classnames("cars", data)[0] == "Make 0 Model 2000"
    domainnet = read_filelist(SPECS["domainnet"], data)
    assert {(e.domain, e.label) for e in domainnet.entries("test")} == {
        (d, c) for d in reference.domains("DomainNet") for c in (0, 3, 200)}
    assert classnames("domainnet", data)[0] == "The Eiffel Tower"
    assert classnames("dtd", data)[0] == "texture00" and len(read_filelist(SPECS["dtd"], data).entries("train")) == 6
    sun = classnames("sun397", data)
    assert "bakery shop" in sun and sun[0] == "place 026" and len(sun) == 397  # sorted a_, b_, ...
    assert classnames("gtsrb", data)[0] == reference.gtsrb_classnames()[0]


def test_name_rules_of_the_fixed_label_spaces(tmp_path: Path) -> None:
    assert classnames("eurosat", tmp_path)[:4] == ("annual crop land", "forest", "brushland or shrubland",
                                                   "highway or road")
    assert classnames("eurosat", tmp_path)[4] == "industrial buildings or commercial buildings"
    assert classnames("mnist", tmp_path) == tuple(str(d) for d in range(10))
