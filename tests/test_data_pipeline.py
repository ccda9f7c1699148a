"""Benchmarks on the fake real datasets through the real code paths: prepare, build, two-step fine-tune,
merge and evaluate with a tiny random CLIP (world-tiny, 32 px) and open_clip's own transforms."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from clmerge import pipeline
from clmerge.benchmarks import build_benchmark
from clmerge.config import BenchmarkConfig, Config, FinetuneConfig, ModelConfig, PathsConfig
from clmerge.data.filelist import read_filelist
from clmerge.data.catalog import SPECS
from clmerge.data.prepare import prepare
from clmerge.data.registry import task_split
from clmerge.errors import UserError
from clmerge.merging.alpha import check_validation_split
from clmerge.store import finetune_dir
from test_data_fakes import FAKES

QUIET = Console(quiet=True)
# (setting, datasets, extra benchmark fields): every dataset is fine-tuned in at least one two-step run
RUNS = [
    ("class_incremental", ["cifar100"], {}),
    ("class_incremental", ["imagenet_r"], {"templates": "cars"}),
    ("class_incremental", ["cub200"], {"templates": "cars"}),
    ("class_incremental", ["cars"], {}),
    ("domain_incremental", ["imagenet_r"], {"domains": ["tattoo", "sketch"], "templates": "cars"}),
    ("domain_incremental", ["domainnet"], {"domains": ["clipart", "sketch"], "templates": "mnist"}),
    ("multi_dataset", ["mnist", "svhn"], {}),
    ("multi_dataset", ["eurosat", "gtsrb"], {}),
    ("multi_dataset", ["resisc45", "dtd"], {}),
    ("multi_dataset", ["sun397", "cars"], {}),
]


def prepared(tmp_path: Path, *names: str) -> Path:
    """Write and prepare the fakes of `names`; returns the data root."""
    data = tmp_path / "data"
    for name in names:
        src, _ = FAKES[name](tmp_path / "downloads" / name)
        prepare(name, src, data, test_fraction=0.5)
    return data


def config(tmp_path: Path, setting: str, datasets: list[str], data: Path, **fields: Any) -> Config:
    multi = setting == "multi_dataset"
    benchmark = BenchmarkConfig(name=f"fake-{'-'.join(datasets)}", setting=setting,
                                dataset="multi" if multi else datasets[0], num_tasks=2,
                                datasets=datasets if multi else [], **{"templates": "default", **fields})
    recipe = FinetuneConfig(lr=1e-3, weight_decay=0.0, batch_size=8, steps=2, warmup_steps=1)
    return Config(benchmark=benchmark, model=ModelConfig(pretrained="none"), finetune=recipe,
                  paths=PathsConfig(store=str(tmp_path / "store"), output=str(tmp_path / "out"), data=str(data)),
                  threads=1)


@pytest.mark.parametrize(("setting", "datasets", "fields"), RUNS, ids=["-".join([s[:3], *d]) for s, d, _ in RUNS])
def test_two_step_finetune(tmp_path: Path, setting: str, datasets: list[str], fields: dict) -> None:
    cfg = config(tmp_path, setting, datasets, prepared(tmp_path, *set(datasets)), **fields)
    path = pipeline.finetune(cfg, QUIET)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["files"]) == 3  # base + 2 task vectors
    tasks = manifest["benchmark"]["tasks"]
    benchmark = build_benchmark(cfg.benchmark, cfg.paths.data, cfg.seed)
    assert [t["classes"] for t in tasks] == [list(t.classes) for t in benchmark.tasks]
    assert len(manifest["benchmark"]["classnames"]) == benchmark.num_classes
    if setting == "class_incremental":
        assert manifest["benchmark"]["class_order"] == list(benchmark.class_order)
    if setting == "multi_dataset":
        assert [t["dataset"] for t in tasks] == datasets
        assert tasks[1]["label_offset"] == SPECS[datasets[0]].num_classes


def test_run_multi_dataset_scores_each_task_with_its_own_head(tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[str, str]] = []
    for module in ("clmerge.training.regimes", "clmerge.evaluation.testset"):
        original = __import__(module, fromlist=["task_split"]).task_split

        def spy(cfg, task, split, seed, root="data", transform=None, _original=original):
            seen.append((split, type(transform.transforms[0]).__name__))
            return _original(cfg, task, split, seed, root, transform)

        monkeypatch.setattr(f"{module}.task_split", spy)
    cfg = config(tmp_path, "multi_dataset", ["mnist", "svhn"], prepared(tmp_path, "mnist", "svhn"))
    results = pipeline.run(cfg, QUIET, tmp_path / "out")
    assert {kind for split, kind in seen if split == "train"} == {"RandomResizedCrop"}  # open_clip train
    assert {kind for split, kind in seen if split == "test"} == {"Resize"}  # eval: resize + center crop
    assert results["test_sizes"] == [10, 10]
    for entry in results["methods"].values():
        assert entry["correct"] == entry["correct_task_aware"]


def test_epochs_come_from_the_benchmark_when_the_recipe_leaves_them_null(tmp_path: Path) -> None:
    cfg = config(tmp_path, "multi_dataset", ["mnist", "svhn"], prepared(tmp_path, "mnist", "svhn"),
                 dataset_epochs={"mnist": 1, "svhn": 2})
    cfg.finetune.steps, cfg.finetune.epochs = None, None
    manifest = json.loads((pipeline.finetune(cfg, QUIET) / "manifest.json").read_text())
    steps = [manifest["files"][f"task_{i:03d}.safetensors"]["steps"] for i in range(2)]
    assert steps == [1 * 3, 2 * 3]  # epochs * ceil(20 / 8)
    cfg.benchmark.dataset_epochs = {"mnist": 1}
    cfg.paths.store = str(tmp_path / "store2")
    with pytest.raises(UserError, match="finetune.epochs is null"):
        pipeline.finetune(cfg, QUIET)


def test_corrupt_image_names_its_path_unless_skipping_is_asked(tmp_path: Path) -> None:
    data = prepared(tmp_path, "cub200")
    listing = read_filelist(SPECS["cub200"], data)
    broken = listing.root / listing.entries("train")[0].path
    broken.write_bytes(b"not a jpeg")
    cfg = config(tmp_path, "class_incremental", ["cub200"], data, templates="cars")
    with pytest.raises(UserError, match=f"cannot read image {broken}"):
        pipeline.finetune(cfg, QUIET)
    cfg.benchmark.skip_corrupt = True
    assert (pipeline.finetune(cfg, QUIET) / "manifest.json").is_file()


def test_seeded_class_order_is_recorded_and_follows_the_seed(tmp_path: Path) -> None:
    cfg = config(tmp_path, "class_incremental", ["cifar100"], prepared(tmp_path, "cifar100"), class_order="seeded")
    manifest = json.loads((pipeline.finetune(cfg, QUIET) / "manifest.json").read_text())
    order = manifest["benchmark"]["class_order"]
    assert sorted(order) == list(range(100))
    assert order == list(build_benchmark(cfg.benchmark, seed=0).class_order)
    assert order != list(build_benchmark(cfg.benchmark, seed=1).class_order)
    assert finetune_dir(cfg).manifest["status"] == "complete"


@pytest.mark.parametrize("arrange", ["missing", "raw"])
def test_missing_or_raw_data_dir_is_one_line_naming_layout_and_command(cli, tmp_path: Path, arrange: str) -> None:
    if arrange == "raw":  # the user points paths.data at the unprepared download
        FAKES["imagenet_r"](tmp_path / "data")
    result = cli("finetune", "--benchmark", "class_incremental/imagenet_r", "model=world_tiny",
                 "model.pretrained=none", f"paths.data={tmp_path / 'data'}", f"paths.store={tmp_path / 's'}",
                 f"paths.output={tmp_path / 'o'}")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "imagenet-r/clmerge.json" in lines[0] and "clmerge data prepare imagenet_r --src" in lines[0]


def test_mis_arranged_source_is_one_line(cli, tmp_path: Path) -> None:
    src, _ = FAKES["cub200"](tmp_path)
    (src / "train_test_split.txt").unlink()
    result = cli("data", "prepare", "cub200", "--src", str(src), "--dst", "data")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "train_test_split.txt is missing" in result.stderr
    result = cli("data", "check", "svhn", "--root", "data")
    assert result.exit_code == 2 and "clmerge data prepare svhn" in result.stderr


@pytest.mark.parametrize(("setting", "datasets"), [("multi_dataset", ["mnist", "svhn"]),  # arrays
                                                   ("class_incremental", ["cars"])])  # a file list
def test_val_fraction_carves_each_tasks_validation_images_out_of_its_training_images(
        tmp_path: Path, setting: str, datasets: list[str]) -> None:
    data = prepared(tmp_path, *datasets)
    keep = lambda image: image  # noqa: E731 - images are never loaded: only indices and labels are compared
    whole = config(tmp_path, setting, datasets, data).benchmark
    carved = dataclasses.replace(whole, val_fraction=0.5)
    task = build_benchmark(whole, data, 0).tasks[0]
    everything = task_split(whole, task, "train", 0, data, keep)
    train, val = (task_split(carved, task, split, 0, data, keep) for split in ("train", "val"))
    assert sorted(train.indices + val.indices) == list(range(len(everything)))  # disjoint, nothing lost
    for label in set(everything.labels):  # half of every class, an image on each side (none of a lone one)
        members = [i for i, found in enumerate(everything.labels) if found == label]
        held = [i for i in val.indices if everything.labels[i] == label]
        assert (1 <= len(held) < len(members) and abs(len(held) - len(members) / 2) <= 0.5) if len(members) > 1 \
            else held == []
    assert val.indices  # the fakes have classes of several images
    assert task_split(carved, task, "val", 0, data, keep).indices == val.indices  # the seed decides
    assert any(task_split(carved, task, "val", seed, data, keep).indices != val.indices for seed in (1, 2, 3))
    assert len(task_split(carved, task, "test", 0, data, keep)) == len(task_split(whole, task, "test", 0, data, keep))
    with pytest.raises(UserError, match="benchmark.val_fraction=0.1") as err:
        task_split(whole, task, "val", 0, data, keep)
    assert "\n" not in str(err.value)


def test_a_task_whose_classes_have_one_training_image_has_no_validation_split(tmp_path: Path) -> None:
    data = prepared(tmp_path, "cifar100")  # the fake has one training image per class
    carved = dataclasses.replace(config(tmp_path, "class_incremental", ["cifar100"], data).benchmark,
                                 val_fraction=0.5)
    task = build_benchmark(carved, data, 0).tasks[0]
    assert len(task_split(carved, task, "train", 0, data, lambda image: image)) == len(task.classes)  # all kept
    with pytest.raises(UserError, match="one training image") as err:
        task_split(carved, task, "val", 0, data, lambda image: image)
    assert "\n" not in str(err.value)


def test_alpha_auto_on_a_real_dataset_picks_lambda_on_held_out_training_images(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    cfg = config(tmp_path, "multi_dataset", ["mnist", "svhn"], prepared(tmp_path, "mnist", "svhn"))
    auto = dataclasses.replace(cfg, merge=dataclasses.replace(cfg.merge, method="average", alpha="auto",
                                                               alpha_grid=[0.5, 1.0]))
    with pytest.raises(UserError, match="benchmark.val_fraction is 0"):
        check_validation_split(auto)
    auto = dataclasses.replace(auto, benchmark=dataclasses.replace(auto.benchmark, val_fraction=0.5))
    check_validation_split(auto)
    auto = dataclasses.replace(auto, eval=dataclasses.replace(auto.eval, methods=["average"]))
    pipeline.finetune(auto, QUIET)
    results = pipeline.evaluate(auto, QUIET, tmp_path / "eval")  # picks lambda itself: no merge command ran
    curve = results["methods"]["average"]["alpha_auto"]
    assert curve["grid"] == [0.5, 1.0] and curve["alpha"] in (0.5, 1.0)
    assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["methods"]["average"]["alpha_auto"] == curve
    monkeypatch.setattr("clmerge.merging.job.alpha_curve", lambda *args: pytest.fail("the curve was recomputed"))
    pipeline.merge(auto, QUIET, output_dir=tmp_path / "merged")  # reuses the curve the evaluation stored
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["methods"]["average"]["alpha_auto"] == curve
