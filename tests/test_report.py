"""`clmerge report` on a synthetic sweep folder: hand-written results.json files and a failed job."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from clmerge.errors import UserError
from clmerge.reporting import make_report

ZERO = [[3, 2], [3, 2]]  # theta_0: A[0] = [0.3, 0.2]


def results(benchmark: str, seed: int, methods: dict[str, tuple[float, list[list[int]]]],
            test_per_class: int = 5, **config: Any) -> dict[str, Any]:
    """A results.json with two tasks of 10 test images each; the task-aware counts equal the agnostic ones."""
    bench = {"name": benchmark, "setting": "class_incremental", "num_tasks": 2,
             "world": {"test_per_class": test_per_class}}
    return {
        "schema_version": 1, "seed": seed, "test_sizes": [10, 10],
        "config": {"benchmark": bench, "seed": seed, "paths": {"store": f"/tmp/s{seed}"}, **config},
        "benchmark": {"name": benchmark, "setting": "class_incremental",
                      "tasks": [{"name": "task 1"}, {"name": "task 2"}]},
        "zero_shot_row": {"correct": ZERO[0], "correct_task_aware": ZERO[0]},
        "methods": {name: {"alpha": alpha, "correct": rows, "correct_task_aware": rows}
                    for name, (alpha, rows) in methods.items()},
    }


def write(path: Path, document: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(document))


def hydra_job(path: Path, name: str, overrides: list[str]) -> None:
    """What Hydra leaves in a job folder: .hydra/hydra.yaml (job name) and overrides.yaml."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    name: {name}\n")
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    sweep_dir = root / "multirun" / "run" / "2026-01-01_00-00-00"
    write(sweep_dir / "0", results("cil-a", 0, {"zero_shot": (0.0, ZERO), "magmax": (0.5, [[8, 1], [6, 9]])}))
    write(sweep_dir / "1", results("cil-a", 1, {"zero_shot": (0.0, ZERO), "magmax": (0.5, [[8, 1], [4, 7]])}))
    hydra_job(sweep_dir / "0", "run", ["seed=0"])
    hydra_job(sweep_dir / "1", "run", ["seed=1"])
    hydra_job(sweep_dir / "2", "run", ["seed=2"])  # failed: no results.json
    hydra_job(root / "merge" / "2026-01-01_00-00-01", "merge", ["merge.alpha=0.3"])  # writes none: not failed
    # same name, another test size: a different benchmark, never averaged with cil-a
    write(root / "run" / "2026-01-02_00-00-00",
          results("cil-a", 0, {"magmax": (0.5, [[10, 0], [5, 5]])}, test_per_class=7))
    return root


def test_report_table_files_and_the_failed_job(sweep: Path, tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    written = make_report([sweep], console, out=tmp_path / "report")
    assert [p.name for p in written] == ["report.md", "report.csv", "report.json"]
    text = console.export_text()
    assert "cil-a (world.test_per_class=5)" in text and "cil-a (world.test_per_class=7)" in text
    # magmax: final accuracy 0.75 (seed 0) and 0.55 (seed 1): mean 65.0, sample std 14.1
    assert "65.0 ± 14.1 (2)" in text and "25.0 ± 0.0 (2)" in text and "50.0 (1)" in text
    assert "skipped" in text and str(sweep / "multirun" / "run" / "2026-01-01_00-00-00" / "2") in text
    assert "seed=2" in text and "merge" not in text.split("skipped", 1)[1]

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| magmax λ=0.5 | 65.0 ± 14.1 (2) | 50.0 (1) |" in markdown
    # forward transfer: A[1][2] - A[0][2] = 0.1 - 0.2 for both seeds; 0.0 - 0.2 on the other benchmark
    fwt = markdown.split("## forward transfer (vs zero-shot), task-agnostic")[1]
    assert "| magmax λ=0.5 | -10.0 ± 0.0 (2) | -20.0 (1) |" in fwt

    rows = list(csv.DictReader(io.StringIO((tmp_path / "report" / "report.csv").read_text())))
    [row] = [r for r in rows if r["benchmark"].endswith("=5)") and r["method"] == "magmax"
             and r["metric"] == "forgetting" and r["protocol"] == "aware"]
    # forgetting: 0.8 - 0.6 (seed 0), 0.8 - 0.4 (seed 1)
    assert float(row["mean"]) == pytest.approx(0.3) and float(row["std"]) == pytest.approx(0.1414, abs=1e-4)
    assert row["n"] == "2" and row["seeds"] == "0 1"

    document = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(document["benchmarks"]) == 2
    assert [s["path"] for s in document["skipped"]] == [str(sweep / "multirun" / "run" / "2026-01-01_00-00-00" / "2")]


def test_a_lambda_sweep_gives_one_row_per_lambda_and_a_variant_per_other_key(tmp_path: Path) -> None:
    for seed in (0, 1):
        for alpha, rows in ((0.3, [[5, 1], [5, 5]]), (0.5, [[8, 1], [6, 9]])):
            write(tmp_path / f"a{alpha}-s{seed}", results("b", seed, {"magmax": (alpha, rows)},
                                                           merge={"alpha": alpha}))
        write(tmp_path / f"lr-s{seed}", results("b", seed, {"magmax": (0.5, [[8, 1], [6, 9]])},
                                                merge={"alpha": 0.5}, finetune={"lr": 1e-3}))
    console = Console(record=True, width=200)
    make_report([tmp_path], console)
    text = console.export_text()
    assert "magmax λ=0.3 [finetune.lr=∅]" in text and "50.0 ± 0.0 (2)" in text
    assert "magmax λ=0.5 [finetune.lr=0.001]" in text


def test_no_results_and_unreadable_results_are_one_line_errors(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cli("report", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: no results.json under") and len(result.stderr.splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    result = cli("report", str(tmp_path / "bad"))
    assert result.exit_code == 2 and "cannot read" in result.stderr and len(result.stderr.splitlines()) == 1
    with pytest.raises(UserError, match="does not exist"):
        make_report([tmp_path / "missing"], Console(quiet=True))


def test_report_command_writes_the_files(cli, sweep: Path, tmp_path: Path) -> None:
    result = cli("report", str(sweep), "--out", str(tmp_path / "r"), "--metric", "forgetting")
    assert result.exit_code == 0, result.stderr
    assert "forgetting" in result.stdout
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.csv", "report.json", "report.md"]


def test_results_from_before_and_after_val_fraction_group_together(tmp_path: Path) -> None:
    older = results("b", 0, {"magmax": (0.5, [[8, 1], [6, 9]])})
    newer = results("b", 1, {"magmax": (0.5, [[8, 1], [4, 7]])})
    newer["config"]["benchmark"]["val_fraction"] = 0.0  # written since the field exists; older files lack it
    carved = results("b", 2, {"magmax": (0.5, [[8, 1], [4, 7]])})
    carved["config"]["benchmark"]["val_fraction"] = 0.1  # trained on fewer images: another benchmark
    for name, document in (("old", older), ("new", newer), ("carved", carved)):
        write(tmp_path / name, document)
    console = Console(record=True, width=200)
    make_report([tmp_path], console, out=tmp_path / "report")
    text = console.export_text()
    assert "65.0 ± 14.1 (2)" in text  # seeds 0 and 1 averaged in one group
    assert "val_fraction=0.1" in text
