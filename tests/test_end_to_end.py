"""End to end: the real `clmerge` command in subprocesses on the built-in world, tiny step budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["finetune.steps=3", "benchmark.world.train_per_class=6", "benchmark.world.test_per_class=10",
        "threads=2"]


def clmerge(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "error"}
    paths = [f"paths.store={tmp / 'store'}", f"paths.output={tmp / 'out'}"]
    command = [str(Path(sys.executable).with_name("clmerge")), *args, *paths]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def test_merge_before_finetune_names_the_finetune_command(workdir: Path) -> None:
    result = clmerge("merge", "--method", "magmax", *TINY, tmp=workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "clmerge finetune" in lines[0] and "finetune.steps=3" in lines[0]
    assert "Traceback" not in result.stderr


def test_finetune_merge_eval_then_a_lambda_sweep(workdir: Path) -> None:
    finetuned = clmerge("finetune", *TINY, tmp=workdir)
    assert finetuned.returncode == 0, finetuned.stderr
    [run_dir] = (workdir / "store" / "finetune").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert [f"task_{i:03d}.safetensors" in manifest["files"] for i in range(5)] == [True] * 5

    merged = clmerge("merge", "--method", "magmax", *TINY, tmp=workdir)
    assert merged.returncode == 0, merged.stderr
    evaluated = clmerge("eval", "--methods", "magmax,average", *TINY, tmp=workdir)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "magmax" in evaluated.stdout and "seq_ft" in evaluated.stdout

    [results_file] = (workdir / "out" / "eval").glob("*/results.json")
    results = json.loads(results_file.read_text())
    assert results["schema_version"] == 1
    assert results["store"]["finetune"] == manifest["key"] == run_dir.name
    assert results["config"]["finetune"]["steps"] == 3
    assert results["benchmark"]["setting"] == "class_incremental"
    assert sorted(results["methods"]) == ["average", "magmax", "seq_ft", "zero_shot"]
    sizes = results["test_sizes"]
    assert sizes == [40] * 5  # 4 classes x 10 test images per task
    for entry in results["methods"].values():
        matrix = entry["accuracy_matrix"]
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
        assert entry["final_accuracy"] == pytest.approx(sum(matrix[-1]) / 5)
    # the shipped pretrained weights recognise the world zero-shot: far above chance (5 %)
    assert results["methods"]["zero_shot"]["final_accuracy"] > 0.10

    sweep = clmerge("merge", "-m", "merge.alpha=0.3,0.5", *TINY, tmp=workdir)
    assert sweep.returncode == 0, sweep.stderr
    records = sorted((workdir / "out" / "multirun" / "merge").glob("*/*/merge.json"))
    assert len(records) == 2
    alphas = sorted(json.loads(r.read_text())["methods"]["magmax"]["alpha"] for r in records)
    assert alphas == [0.3, 0.5]


def test_pam_run_with_lora_through_the_cli(tmp_path: Path) -> None:
    recipe = ["finetune=pam", "finetune.adapter=lora", "finetune.lora.r=4", "finetune.pam.every=2",
              "benchmark.num_tasks=3", *TINY]
    result = clmerge("run", *recipe, tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    [results_file] = (tmp_path / "out" / "run").glob("*/results.json")
    results = json.loads(results_file.read_text())
    assert sorted(results["methods"]) == ["pam", "pam_task", "pam_task+average", "pam_task+magmax", "zero_shot"]
    assert results["config"]["finetune"]["regime"] == "pam"
    training = results["training"]
    assert "pam" not in training[0]  # nothing to align the first task with
    assert training[2]["pam"]["alignments"] == 2  # steps 2 and 3 (the last) of 3
    assert training[2]["pam"]["conflict_rate_protected"] == 0.0
    [run_dir] = (tmp_path / "store" / "finetune").iterdir()
    assert {p.name for p in run_dir.glob("lora_*")} == {f"lora_{i:03d}.safetensors" for i in range(3)}

    merged = clmerge("merge", "--method", "pam", *recipe, tmp=tmp_path)  # PAM's own merge, on its own
    assert merged.returncode == 0, merged.stderr
    [record] = (tmp_path / "out" / "merge").glob("*/merge.json")
    entry = json.loads(record.read_text())["methods"]["pam"]
    assert entry["alpha"] == 1.0 and (Path(entry["store"]) / "final.safetensors").is_file()
