"""`clmerge report` on a synthetic sweep folder: hand-written results.json files and a failed job."""

from __future__ import annotations

import csv
import errno
import io
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from rich.console import Console

from clmerge.errors import UserError
from clmerge.manifest import sealed_bytes
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


def with_controls(document: dict[str, Any], zero: int, counts: list[int]) -> dict[str, Any]:
    """`document` with one held-out control set of 20 images: theta_0 gets `zero` right, magmax `counts`."""
    document["control_sizes"] = {"world/swirl": 20}
    document["zero_shot_row"]["control_correct"] = {"world/swirl": zero}
    document["methods"]["magmax"]["control_correct"] = {"world/swirl": counts}
    return document


def test_a_valid_control_set_gives_zero_shot_retention(tmp_path: Path) -> None:
    write(tmp_path / "run", with_controls(results("b", 0, {"magmax": (0.5, [[8, 1], [6, 9]])}), 10, [9, 6]))
    make_report([tmp_path / "run"], Console(quiet=True), out=tmp_path / "report")
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    [record] = [r for r in document["metrics"]
                if r["metric"] == "zero_shot_retention_final" and r["protocol"] == "aware"]
    assert record["mean"] == pytest.approx((6 - 10) / 20)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change of a results.json: the value at the dotted `path` set to `value` (None deletes it)."""
    def change(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = document
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return change


MALFORMED = [  # (change of a valid results.json, what the error says is wrong)
    (_set("methods.magmax.alpha", None), "methods.magmax.alpha is missing, expected a number (the method's lambda)"),
    (_set("methods.magmax.correct", [[8, 1]]), "methods.magmax.correct has 1 row, expected 2 (one per task)"),
    (_set("methods.magmax.correct_task_aware", [[8], [6]]),
     "methods.magmax.correct_task_aware[0] has 1 value, expected 2 (one per task)"),
    (_set("methods.magmax.correct", [[8, 1], [6, 11]]),
     "methods.magmax.correct[1][1] is 11, expected a count of correct predictions from 0 to 10"),
    (_set("methods.magmax", [1]), "methods.magmax is [1], expected an object"),
    (_set("test_sizes", [10]), "test_sizes has 1 value, expected 2 (one per task)"),
    (_set("benchmark", None), "benchmark is missing, expected an object"),
    (_set("zero_shot_row.correct", [3]), "zero_shot_row.correct has 1 value, expected 2 (one per task)"),
    (_set("zero_shot_row.control_correct", {}),
     "zero_shot_row.control_correct.world/swirl is missing, expected a count of correct predictions from 0 to 20"),
    (_set("methods.magmax.control_correct", {"other": [1, 2]}),
     "methods.magmax.control_correct.other has no test size in control_sizes"),
    (_set("methods.magmax.control_correct", {"world/swirl": [9]}),
     "methods.magmax.control_correct.world/swirl has 1 value, expected 2 (one per task)"),
    (_set("schema_version", 2), "schema_version is 2, expected 1 (written by another clmerge version)"),
    (_set("seed", "0"), 'seed is "0", expected an integer'),
    (_set("config.paths", "/store"), 'config.paths is "/store", expected an object'),
    (_set("store", {"merge": {"magmax": "key"}}), "store.finetune is missing, expected a string"),
]


@pytest.mark.parametrize(("change", "problem"), MALFORMED, ids=[problem.split(" ")[0] for _, problem in MALFORMED])
def test_a_malformed_results_json_stops_the_report_naming_the_file_and_field(tmp_path: Path, change: Callable,
                                                                              problem: str) -> None:
    write(tmp_path / "runs" / "good", results("b", 0, {"magmax": (0.5, [[8, 1], [6, 9]])}))
    bad = with_controls(results("b", 1, {"magmax": (0.5, [[8, 1], [6, 9]])}), 10, [9, 6])
    change(bad)
    write(tmp_path / "runs" / "bad", bad)
    console = Console(record=True)
    with pytest.raises(UserError) as error:
        make_report([tmp_path / "runs"], console, out=tmp_path / "report")
    assert str(error.value) == (f"{tmp_path / 'runs' / 'bad' / 'results.json'}: {problem}; "
                                "rerun `clmerge eval` for that run or remove the file")
    assert console.export_text() == "" and not (tmp_path / "report").exists()


def test_a_results_json_without_the_fields_is_a_one_line_error(cli, tmp_path: Path) -> None:
    write(tmp_path / "run", {"methods": {}, "test_sizes": []})
    result = cli("report", str(tmp_path / "run"))
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'run' / 'results.json'} is not a clmerge results.json")



def test_a_shortened_matrix_is_an_error_before_anything_is_printed_or_written(cli, tmp_path: Path) -> None:
    write(tmp_path / "run", results("b", 0, {"magmax": (0.5, [[8, 1], [6]])}))
    result = cli("report", str(tmp_path / "run"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and result.stdout == "" and not (tmp_path / "o").exists()
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'run' / 'results.json'}: methods.magmax.correct[1] "
                                          "has 1 value, expected 2 (one per task); rerun `clmerge eval` for that run "
                                          "or remove the file"]


@pytest.mark.parametrize(("out", "problem"), [("file.txt", "is a file"),
                                              ("file.txt/report", "lies below {tmp}/file.txt, which is a file")])
def test_out_that_is_or_lies_below_a_file_is_an_error_before_the_table(cli, sweep: Path, tmp_path: Path, out: str,
                                                                       problem: str) -> None:
    (tmp_path / "file.txt").write_text("mine")
    result = cli("report", str(sweep), "--out", str(tmp_path / out))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: --out {tmp_path / out} {problem.format(tmp=tmp_path)}; give a "
                                          "folder (it is created when missing)"]
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_out_that_cannot_be_written_is_an_error_before_the_table(cli, sweep: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(**kwargs: Any) -> str:  # what a folder without write permission answers (root is never refused)
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"]))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    result = cli("report", str(sweep), "--out", str(tmp_path / "report"))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: cannot write to --out {tmp_path / 'report'} (Permission denied); "
                                          "give a folder you can write to"]


def staging_leftovers(tmp_path: Path) -> list[Path]:
    """The private folders reports are written into before they are moved to --out."""
    return list(tmp_path.rglob(".clmerge-report-*"))


def test_a_damaged_merge_json_stops_the_report_before_anything_is_written(cli, sweep: Path, tmp_path: Path) -> None:
    (sweep / "merge" / "2026-01-01_00-00-01" / "merge.json").write_text('{"finetune": "/store/ft", "meth')
    result = cli("report", str(sweep), "--out", str(tmp_path / "o"), "--plots")
    assert result.exit_code == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: cannot read {sweep / 'merge' / '2026-01-01_00-00-01' / 'merge.json'} "
                                    "(JSONDecodeError")
    assert result.stderr.rstrip().endswith("rerun `clmerge merge` for that run or remove the file")
    assert not (tmp_path / "o").exists() and staging_leftovers(tmp_path) == []


def test_a_merge_json_curve_of_the_wrong_length_is_a_one_line_error(tmp_path: Path) -> None:
    write(tmp_path / "runs" / "a", results("b", 0, {"magmax": (0.5, [[8, 1], [6, 9]])}))
    curve = {"grid": [0.1, 0.5, 1.0], "accuracy": [0.4, 0.7], "alpha": 0.5}
    (tmp_path / "runs" / "merge.json").write_text(json.dumps({"finetune": "/s/ft", "methods": {
        "magmax": {"alpha": 0.5, "alpha_auto": curve}}}))
    with pytest.raises(UserError, match=r"merge.json: methods.magmax.alpha_auto.accuracy is \[0.4, 0.7\], expected 3 "
                                        r"numbers \(one per lambda\); rerun `clmerge merge`"):
        make_report([tmp_path / "runs"], Console(quiet=True), out=tmp_path / "o", plots=True)
    assert not (tmp_path / "o").exists()


def merge_manifest(tmp_path: Path, body: bytes) -> Path:
    """A run whose store keeps a merge manifest (its merge.alpha=auto curve) with `body`; returns the run."""
    document = results("b", 0, {"average": (0.5, [[8, 1], [6, 9]])})
    document["config"]["paths"]["store"] = str(tmp_path / "store")
    document["store"] = {"finetune": "ft-key", "merge": {"average": "average-key"}}
    write(tmp_path / "run", document)
    manifest = tmp_path / "store" / "merge" / "ft-key" / "average-key" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(body)
    return tmp_path / "run"


def test_store_manifest_curves_are_plotted_and_a_damaged_manifest_is_a_one_line_error(tmp_path: Path) -> None:
    curve = {"grid": [0.1, 0.5, 1.0], "accuracy": [0.4, 0.7, 0.6], "alpha": 0.5}
    manifest = {"schema_version": 2, "clmerge_version": "0", "kind": "merge", "key": "average-key", "files": {},
                "alpha_auto": curve}
    run = merge_manifest(tmp_path / "good", sealed_bytes(manifest))
    written = make_report([run], Console(quiet=True), out=tmp_path / "good" / "o", plots=True)
    assert tmp_path / "good" / "o" / "plots" / "alpha-auto" / "ft-key-average.png" in written
    run = merge_manifest(tmp_path / "bad", b'{"schema_version": 2, "ki')
    with pytest.raises(UserError, match=r"^corrupt manifest .*manifest.json \(.*\); delete .*average-key and rerun"):
        make_report([run], Console(quiet=True), out=tmp_path / "bad" / "o", plots=True)
    assert not (tmp_path / "bad" / "o").exists()


def test_a_report_that_fails_while_writing_leaves_the_old_report_as_it_was(sweep: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from clmerge.reporting import plots

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("the old report")

    def broken(*args: Any) -> Path:
        raise RuntimeError("the disk broke")

    monkeypatch.setattr(plots, "step_curves", broken)  # after the tables and the first heatmaps are written
    with pytest.raises(RuntimeError, match="the disk broke"):
        make_report([sweep], Console(quiet=True), out=out, plots=True)
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "the old report"
    assert staging_leftovers(tmp_path) == []


def test_a_folder_in_place_of_a_report_file_is_an_error_and_nothing_is_moved(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "report" / "report.json").mkdir(parents=True)
    with pytest.raises(UserError, match="report.json: a folder has that name; move it away or give another --out"):
        make_report([sweep], Console(quiet=True), out=tmp_path / "report")
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["report.json"]
    assert staging_leftovers(tmp_path) == []
