"""Sweeps at scale: the launcher configs compose, a joblib multirun on the built-in world is aggregated by
`clmerge report`, and a job that meets another on one checkpoint-store key waits for it and reuses its work."""

from __future__ import annotations

import fcntl
import json
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from clmerge import pipeline
from clmerge.reporting import make_report
from clmerge.store import finetune_dir
from conftest import run_clmerge

TINY_SWEEP = ["model.pretrained=none", "benchmark.num_tasks=2", "finetune.steps=2", "finetune.batch_size=8",
              "benchmark.world.train_per_class=4", "benchmark.world.test_per_class=3", "threads=1",
              "eval.methods=[magmax]"]


@pytest.mark.parametrize(("launcher", "expected"), [("local", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(cli, launcher: str, expected: str) -> None:
    result = cli("run", "--cfg", "hydra", f"hydra/launcher={launcher}")
    assert result.exit_code == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.slow
def test_joblib_multirun_of_two_seeds_is_aggregated_by_report(tmp_path: Path) -> None:
    paths = [f"paths.store={tmp_path / 'store'}", f"paths.output={tmp_path / 'out'}"]
    result = run_clmerge(["run", "-m", "seed=0,1", "hydra/launcher=local", *TINY_SWEEP, *paths], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep] = (tmp_path / "out" / "multirun" / "run").iterdir()
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "1"]
    console = Console(record=True, width=200)
    make_report([tmp_path / "out"], console, out=tmp_path / "report")
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    [benchmark] = document["benchmarks"]
    assert [row["method"] for row in benchmark["rows"]] == ["zero_shot", "seq_ft", "magmax"]
    assert all(sorted(run["seed"] for run in row["runs"]) == [0, 1] for row in benchmark["rows"])
    finals = [json.loads(p.read_text())["methods"]["magmax"]["final_accuracy"] for p in sweep.glob("*/results.json")]
    [record] = [r for r in document["metrics"] if r["method"] == "magmax" and r["metric"] == "final_accuracy"
                and r["protocol"] == "agnostic"]
    assert record["n"] == 2 and record["mean"] == pytest.approx(sum(finals) / 2)


def held_by_another(lock_file: Path) -> bool:
    """Whether someone else holds the flock on `lock_file`."""
    if not lock_file.exists():
        return False
    with open(lock_file) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_a_second_job_on_a_key_being_written_waits_and_reuses_its_work(tmp_path: Path) -> None:
    from test_pipeline import tiny_cfg

    cfg = tiny_cfg(tmp_path)
    finished: list[int] = []

    def first_job() -> None:
        pipeline.finetune(cfg, Console(quiet=True))
        finished.append(time.time_ns())

    thread = threading.Thread(target=first_job)
    thread.start()
    while not held_by_another(finetune_dir(cfg).path / ".lock"):  # the first job of the sweep holds the key
        time.sleep(0.01)
    path = pipeline.finetune(cfg, Console(quiet=True))  # waits, then finds every task done
    assert finished, "the second job returned before the first one finished"
    thread.join()
    tasks = [path / f"task_{i:03d}.safetensors" for i in range(cfg.benchmark.num_tasks)]
    assert all(task.stat().st_mtime_ns <= finished[0] for task in tasks)  # nothing was trained twice
    assert json.loads((path / "manifest.json").read_text())["status"] == "complete"
