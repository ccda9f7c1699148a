"""The library pipeline on the built-in world with a tiny budget: resume, regimes, results."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from clmerge import pipeline
from clmerge.config import BenchmarkConfig, Config, FinetuneConfig, ModelConfig, PathsConfig, WorldDataConfig
from clmerge.errors import NotFinetuned
from clmerge.store import finetune_dir, task_file

QUIET = Console(quiet=True)


def tiny_cfg(tmp_path: Path, setting: str = "class_incremental", **finetune: object) -> Config:
    if setting == "class_incremental":
        benchmark = BenchmarkConfig(name="cil-tiny", setting=setting, dataset="world", templates="world",
                                    num_tasks=3, world=WorldDataConfig(domain="blur", train_per_class=4,
                                                                       test_per_class=3))
    else:
        benchmark = BenchmarkConfig(name="dil-tiny", setting=setting, dataset="world", templates="world",
                                    num_tasks=2, domains=["outline", "noise"],
                                    world=WorldDataConfig(train_per_class=2, test_per_class=2))
    recipe = dict(lr=1e-3, weight_decay=0.0, batch_size=16, steps=2, warmup_steps=1, **finetune)
    return Config(benchmark=benchmark, model=ModelConfig(pretrained="none"), finetune=FinetuneConfig(**recipe),
                  paths=PathsConfig(store=str(tmp_path / "store"), output=str(tmp_path / "out")), threads=2)


def test_rerun_skips_finished_tasks_and_resumes_bit_identically(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    path = pipeline.finetune(cfg, QUIET)
    manifest = json.loads((path / "manifest.json").read_text())
    hashes = {name: manifest["files"][name]["sha256"] for name in manifest["files"]}
    assert manifest["status"] == "complete" and len(hashes) == 4  # base + 3 tasks
    # simulate a crash after task 2: the last task's file and record are gone
    (path / task_file(2)).unlink()
    store = finetune_dir(cfg)
    del store.manifest["files"][task_file(2)]
    store.write_manifest()
    first_mtime = (path / task_file(0)).stat().st_mtime_ns
    pipeline.finetune(cfg, QUIET)
    resumed = json.loads((path / "manifest.json").read_text())
    assert {name: resumed["files"][name]["sha256"] for name in resumed["files"]} == hashes
    assert (path / task_file(0)).stat().st_mtime_ns == first_mtime


def test_regimes_share_task_one_and_differ_afterwards(tmp_path: Path) -> None:
    seq = json.loads((pipeline.finetune(tiny_cfg(tmp_path), QUIET) / "manifest.json").read_text())
    ind_cfg = tiny_cfg(tmp_path, regime="independent")
    ind = json.loads((pipeline.finetune(ind_cfg, QUIET) / "manifest.json").read_text())
    assert seq["files"][task_file(0)]["sha256"] == ind["files"][task_file(0)]["sha256"]
    assert seq["files"][task_file(1)]["sha256"] != ind["files"][task_file(1)]["sha256"]


def test_merge_and_eval_without_finetuning_name_the_command(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(NotFinetuned, match="clmerge finetune"):
        pipeline.merge(cfg, QUIET)
    with pytest.raises(NotFinetuned):
        pipeline.evaluate(cfg, QUIET, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["class_incremental", "domain_incremental"])
def test_run_writes_a_complete_results_file(tmp_path: Path, setting: str) -> None:
    cfg = tiny_cfg(tmp_path, setting)
    results = pipeline.run(cfg, QUIET, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    tasks = cfg.benchmark.num_tasks
    assert set(on_disk["methods"]) == {"zero_shot", "seq_ft", "magmax", "average"}
    assert on_disk["store"]["finetune"] == finetune_dir(cfg).manifest["key"]
    assert on_disk["config"]["benchmark"]["setting"] == setting
    sizes = on_disk["test_sizes"]
    assert len(sizes) == tasks and all(n > 0 for n in sizes)
    for entry in on_disk["methods"].values():
        assert len(entry["correct"]) == tasks and all(len(row) == tasks for row in entry["correct"])
        assert all(0 <= c <= n for row in entry["correct"] for c, n in zip(row, sizes))
        # task-aware restricts the argmax to a subset containing the label: never fewer correct
        assert all(a >= c for ra, rc in zip(entry["correct_task_aware"], entry["correct"]) for a, c in zip(ra, rc))
    methods = on_disk["methods"]
    # after step 1, averaging with lambda 1 deploys theta_0 + tau_1: exactly the fine-tuned model
    assert methods["average"]["correct"][0] == methods["seq_ft"]["correct"][0]
    assert methods["zero_shot"]["correct"][0] == methods["zero_shot"]["correct"][-1]
    assert methods["magmax"]["alpha"] == 0.5 and methods["average"]["alpha"] == 1.0
    if setting == "domain_incremental":
        assert methods["seq_ft"]["correct"] == methods["seq_ft"]["correct_task_aware"]
    assert on_disk["control_sizes"] == {}  # no control set configured: no zero-shot retention
    assert methods["seq_ft"]["zero_shot_retention"] is None


def test_zero_shot_retention_on_a_held_out_world_domain(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, benchmark=dataclasses.replace(cfg.benchmark, control=["world/swirl", "world/dots"]))
    results = pipeline.run(cfg, QUIET, tmp_path / "out")
    assert results["control_sizes"] == {"world/swirl": 60, "world/dots": 60}  # 20 classes x 3 test images
    zero = results["zero_shot_row"]["control_correct"]
    methods = results["methods"]
    assert methods["zero_shot"]["zero_shot_retention"] == [0.0, 0.0, 0.0]
    for name in ("seq_ft", "magmax"):
        counts = methods[name]["control_correct"]
        expected = [((counts["world/swirl"][t] - zero["world/swirl"]) / 60
                     + (counts["world/dots"][t] - zero["world/dots"]) / 60) / 2 for t in range(3)]
        assert methods[name]["zero_shot_retention"] == pytest.approx(expected)
        assert methods[name]["zero_shot_retention_final"] == pytest.approx(expected[-1])
    # after step 1, averaging with lambda 1 is the fine-tuned model: same control counts
    assert methods["average"]["control_correct"]["world/swirl"][0] == methods["seq_ft"]["control_correct"]["world/swirl"][0]


def test_changing_lambda_reuses_the_merged_vectors(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    pipeline.finetune(cfg, QUIET)
    first = pipeline.merge(cfg, QUIET, output_dir=tmp_path / "a")
    cfg2 = dataclasses.replace(cfg, merge=dataclasses.replace(cfg.merge, alpha=0.3))
    second = pipeline.merge(cfg2, QUIET, output_dir=tmp_path / "b")
    assert first == second
    assert json.loads((tmp_path / "b" / "merge.json").read_text())["methods"]["magmax"]["alpha"] == 0.3


def test_training_log_is_off_by_default_and_records_every_step_as_csv(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    pipeline.finetune(cfg, QUIET, tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "training_log.csv").exists()
    logged = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, log="csv"))
    assert finetune_dir(logged).path == finetune_dir(cfg).path  # logging does not change the store key
    shutil.rmtree(finetune_dir(cfg).path)
    pipeline.finetune(logged, QUIET, tmp_path / "run")
    rows = (tmp_path / "run" / "training_log.csv").read_text().splitlines()
    assert rows[0] == "task,step,lr,loss,seconds"
    steps = [row.split(",") for row in rows[1:]]
    assert [(task, int(step)) for task, step, *_ in steps] == [
        (f"task{t}", s) for t in (1, 2, 3) for s in (1, 2)]
    assert all(float(lr) > 0 and float(loss) > 0 for _, _, lr, loss, _ in steps)
