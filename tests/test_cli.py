"""The Typer CLI: help, option -> override wiring, argv forwarding, one-line errors, multirun."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY, files_under, run_clmerge

from clmerge import hydra_app, pipeline
from clmerge.cli import _quoted
from clmerge.config import Config
from clmerge.merging.methods import METHODS
from clmerge.reporting.aggregate import METRICS

COMMANDS = ["finetune", "merge", "eval", "run", "pretrain", "config show", "store verify"]


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit status 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(cli, command: str) -> None:
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0
    assert "Examples" in result.stdout and f"clmerge {command}" in result.stdout


def test_top_level_help_lists_the_commands(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("finetune", "merge", "eval", "run", "pretrain", "config"):
        assert command in result.stdout


def test_help_names_every_merge_method_and_report_metric(cli) -> None:
    merge_help, report_help = cli("merge", "--help").stdout, cli("report", "--help").stdout
    assert [m for m in METHODS if m not in merge_help] == []
    assert [m for m in METRICS if m not in report_help] == []


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], bool]]:
    """Record what the CLI hands to hydra_app.launch instead of running it (wiring tests only)."""
    calls: list[tuple[str, list[str], bool]] = []
    monkeypatch.setattr(hydra_app, "launch", lambda command, args, multirun=False: calls.append(
        (command, args, multirun)))
    return calls


def test_typed_options_become_overrides_before_the_trailing_ones(cli, launched) -> None:
    assert cli("merge", "--method", "average", "--benchmark", "domain_incremental/world", "--seed", "3",
               "merge.alpha=0.7").exit_code == 0
    assert cli("run", "--methods", "magmax, average", "-m", "seed=0,1").exit_code == 0
    assert cli("finetune", "--cfg", "job", "--info", "defaults").exit_code == 0
    assert launched == [
        ("merge", ["benchmark=domain_incremental/world", "seed=3", "merge=average", "merge.alpha=0.7"], False),
        ("run", ["eval.methods=[magmax,average]", "seed=0,1"], True),
        ("finetune", ["--cfg", "job", "--info", "defaults"], False),
    ]


def test_forward_to_hydra_rewrites_argv_once_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["clmerge", "finetune", "--seed", "1"])
    seen: list[list[str]] = []

    def main() -> None:
        seen.append(list(sys.argv))
        raise RuntimeError("job failed")

    with pytest.raises(RuntimeError):
        hydra_app.forward_to_hydra(main, ["--multirun", "hydra.job.name=finetune", "seed=0,1"])
    assert seen == [["clmerge", "--multirun", "hydra.job.name=finetune", "seed=0,1"]]
    assert sys.argv == ["clmerge", "finetune", "--seed", "1"]


@pytest.mark.parametrize(("args", "fragments"), [
    (["merge", "--method", "magmx"], ["unknown merge method 'magmx'", "average, dare", "magmax, pam, random_mix"]),
    (["run", "--benchmark", "cifar"], ["unknown benchmark 'cifar'", "class_incremental/world"]),
    (["finetune", "model=vit"], ["unknown model 'vit'", "world_tiny"]),
    (["finetune", "finetune.lr=fast"], ["finetune.lr=fast", "could not be converted to Float"]),
    (["eval", "eval.batchsize=8"], ["unknown config key 'eval.batchsize'", "batch_size"]),
    (["run", "--methods", "magmax,tiez"], ["unknown merge method 'tiez'"]),
    (["finetune", "finetune.steps=0"], ["finetune.steps must be at least 1"]),
    (["merge", "--method", "magmax,average"], ["is a sweep: add -m"]),
    (["finetune", "--seed", "one"], ["'--seed'", "clmerge finetune --help"]),
    (["finetune", "--bogus"], ["unknown option '--bogus'"]),
    (["pretrain", "stepz=3"], ["unknown config key 'stepz'"]),
    (["merge", "-m", "--cfg", "job", "seed=0,1"], ["--cfg shows one config", "drop -m"]),
    (["run", "eval.methods=[]", "eval.baselines=false"], ["nothing to evaluate", "eval.baselines=true"]),
    (["merge", "-m", "--method", "magmax,average", "--export", "s.safetensors"],
     ["jobs 0 and 1 of the sweep would both write --export s.safetensors", "${merge.method}"]),
    (["merge", "-m", "merge.export=s.safetensors,./s.safetensors"], ["jobs 0 and 1", "./s.safetensors"]),
    (["merge", "--export", "${x}.safetensors", "merge.alpha=${nope}"], ["merge.alpha=${nope}"]),
])
def test_user_mistakes_are_one_line_exit_2_and_write_nothing(cli, paths, tmp_path: Path, args: list[str],
                                                             fragments: list[str]) -> None:
    result = cli(*args, *paths)
    assert_one_line_error(result, *fragments)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("args", [["merge.export=a.safetensors,b.safetensors"],
                                  ["--method", "magmax,average", "merge.export=${merge.method}.safetensors"]])
def test_a_sweep_exporting_to_distinct_paths_passes_the_export_check(cli, paths, tmp_path: Path,
                                                                     args: list[str]) -> None:
    result = cli("merge", "-m", *args, *paths)
    assert_one_line_error(result, "nothing is fine-tuned for this config")  # the job ran: no store yet
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("path", ["/runs/${x}.safetensors", "/runs/${oc.env:HOME}.safetensors", "it's.safetensors",
                                  "a\\${x}.safetensors", "a\\'b.safetensors", "ends\\", "a b,c=[d].safetensors"])
def test_an_export_path_reaches_the_config_literally(path: str) -> None:
    for jobs in (hydra_app.validate("merge", [f"merge.export={_quoted(Path(path))}"]),
                 hydra_app.validate("merge", [f"merge.export={_quoted(Path(path))}", "seed=0,1"], multirun=True)):
        assert [cfg.merge.export for cfg in jobs] == [str(Path(path))] * len(jobs)


def test_config_show_prints_yaml_and_rejects_bad_overrides(cli) -> None:
    result = cli("config", "show", "--benchmark", "domain_incremental/world", "finetune=reference")
    assert result.exit_code == 0
    assert "setting: domain_incremental" in result.stdout and "warmup_steps: 500" in result.stdout
    assert_one_line_error(cli("config", "show", "finetune.lr=x"), "finetune.lr=x")


def test_cfg_job_prints_the_config_and_runs_nothing(cli, paths, tmp_path: Path) -> None:
    result = cli("merge", "--method", "average", "--cfg", "job", *paths)
    assert result.exit_code == 0 and "method: average" in result.stdout
    assert files_under(tmp_path) == []


def test_a_library_user_error_inside_a_job_is_one_line_and_leaves_nothing(cli, paths, tmp_path: Path) -> None:
    result = cli("merge", *paths, "seed=5")
    assert_one_line_error(result, "nothing is fine-tuned for this config", "run `clmerge finetune", "seed=5")
    assert "merge=" not in result.stderr  # the merge-only overrides do not change the fine-tuning run
    assert files_under(tmp_path) == []


def test_a_library_user_error_under_multirun_is_one_line_and_leaves_nothing(cli, paths, tmp_path: Path) -> None:
    result = cli("merge", "-m", "--method", "magmax,average", *paths)
    assert_one_line_error(result, "nothing is fine-tuned for this config")
    assert files_under(tmp_path) == []


def test_multirun_runs_one_real_job_per_sweep_value_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    result = run_clmerge(["finetune", "-m", "seed=0,1", *TINY, f"paths.store={tmp_path / 'store'}",
                          f"paths.output={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr
    sweeps = list((out / "multirun" / "finetune").iterdir())
    assert len(sweeps) == 1 and sorted(p.name for p in sweeps[0].iterdir()) == ["0", "1", "multirun.yaml"]
    runs = sorted((tmp_path / "store" / "finetune").iterdir())
    assert len(runs) == 2 and {run.name.split("-s")[-1][0] for run in runs} == {"0", "1"}
    for run in runs:
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["config"]["seed"] in (0, 1)


def test_run_functions_receive_the_typed_config_and_the_hydra_output_dir(cli, paths, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[Config, Path]] = []
    monkeypatch.setattr(pipeline, "evaluate", lambda cfg, console, output_dir: received.append((cfg, output_dir)))
    result = cli("eval", "--methods", "average", "--seed", "2", *paths)
    assert result.exit_code == 0, result.stderr
    ((cfg, output_dir),) = received
    assert isinstance(cfg, Config) and cfg.seed == 2 and cfg.eval.methods == ["average"]
    assert output_dir.parent == tmp_path / "outputs" / "eval" and (output_dir / ".hydra" / "config.yaml").is_file()


def test_the_entry_point_runs_without_warnings(tmp_path: Path) -> None:
    for args in (["--help"], ["run", "--help"], ["config", "show"], ["merge", "--cfg", "job"]):
        result = run_clmerge(args, cwd=tmp_path)
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
    result = run_clmerge(["merge", "--method", "nope"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("error: unknown merge method 'nope'; valid merge methods: average, dare, dare_average, "
                             "dare_magmax, dare_ties, last, magmax, pam, random_mix, task_arithmetic, ties\n")
