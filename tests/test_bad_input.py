"""Property-based sweep of user mistakes on the command line: every one ends with exit status 2, one line on
stderr without a traceback, and nothing written (no store, no run directory).

The property-based sweeps run the real CLI a hundred times (minutes on a loaded 2-core machine): `slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, files_under
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import assert_one_line_error

COMMANDS = st.sampled_from(["finetune", "merge", "eval", "run"])
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# keys of the schema that hold counts, with the least value each accepts
COUNTS = {"finetune.steps": 1, "finetune.batch_size": 1, "finetune.epochs": 1, "benchmark.num_tasks": 1,
          "benchmark.world.train_per_class": 1, "benchmark.world.test_per_class": 1, "eval.batch_size": 1,
          "finetune.warmup_steps": 0, "finetune.num_workers": 0, "eval.num_workers": 0, "threads": 0,
          "benchmark.world.val_per_class": 0, "finetune.checkpoint_every": 0}
NUMBERS = [*COUNTS, "finetune.lr", "finetune.eps", "finetune.weight_decay", "finetune.grad_clip", "seed",
           "merge.dare.p", "merge.ties.k"]
SECTIONS = ["", "finetune.", "benchmark.", "benchmark.world.", "model.", "merge.", "eval.", "paths."]
KNOWN = {"finetune", "benchmark", "model", "merge", "eval", "paths", "seed", "threads", "world", "ties", "dare"}
IDENTIFIERS = st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True)
ODD = st.text(st.characters(codec="utf-8", exclude_characters="$\\'\"\x00", exclude_categories=("Cs",)),
              min_size=1, max_size=12).filter(lambda text: not text.replace("-", "").replace("_", "").isalnum())


def check(cli, tmp_path: Path, command: str, *overrides: str) -> None:
    result = cli(command, f"paths.store={tmp_path / 'store'}", f"paths.output={tmp_path / 'out'}", *overrides)
    assert_one_line_error(result)
    assert files_under(tmp_path) == []


@pytest.mark.slow
@SETTINGS
@given(command=COMMANDS, key=st.sampled_from(NUMBERS), value=st.from_regex(r"[a-zA-Z][a-zA-Z_]{0,8}", fullmatch=True))
def test_wrong_types(cli, tmp_path: Path, command: str, key: str, value: str) -> None:
    if value in ("null", "true", "false", "inf", "nan", "True", "False", "NaN", "Inf"):
        value = value + "x"
    check(cli, tmp_path, command, f"{key}={value}")


@pytest.mark.slow
@SETTINGS
@given(command=COMMANDS, key=st.sampled_from(sorted(COUNTS)), below=st.integers(1, 10**9))
def test_negative_or_zero_counts(cli, tmp_path: Path, command: str, key: str, below: int) -> None:
    check(cli, tmp_path, command, f"{key}={COUNTS[key] - below}")


@pytest.mark.slow
@SETTINGS
@given(command=COMMANDS, extra=st.integers(1, 10**6), setting=st.sampled_from(["class", "domain"]))
def test_more_tasks_than_classes_or_domains(cli, tmp_path: Path, command: str, extra: int, setting: str) -> None:
    if setting == "class":  # the world has 20 classes
        check(cli, tmp_path, command, f"benchmark.num_tasks={20 + extra}")
    else:  # the domain-incremental world lists 4 domains
        check(cli, tmp_path, command, "benchmark=domain_incremental/world", f"benchmark.num_tasks={4 + extra}")


@pytest.mark.parametrize("overrides", [
    ["benchmark.class_order=[]"], ["benchmark=domain_incremental/world", "benchmark.domains=[]"],
    ["benchmark.class_order=[0,0,1]"], ["benchmark=multi_dataset/eight_datasets", "benchmark.datasets=[]"],
    ["finetune.betas=[]"]])
def test_empty_or_broken_lists(cli, tmp_path: Path, overrides: list[str]) -> None:
    check(cli, tmp_path, "run", *overrides)


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["benchmark.val_fraction=1.0"], "benchmark.val_fraction=1.0 is not valid"),
    (["benchmark.val_fraction=-0.1"], "benchmark.val_fraction=-0.1 is not valid"),
    (["benchmark.val_fraction=0.1"], "benchmark.world.val_per_class=N"),  # the world renders its own
    (["benchmark=class_incremental/cifar100", "merge.alpha=auto"], "benchmark.val_fraction=0.1"),
])
def test_bad_validation_fractions_are_one_line(cli, tmp_path: Path, overrides: list[str], fragment: str) -> None:
    result = cli("merge", f"paths.store={tmp_path / 'store'}", f"paths.output={tmp_path / 'out'}", *overrides)
    assert_one_line_error(result, fragment)
    assert files_under(tmp_path) == []


@pytest.mark.slow
@SETTINGS
@given(command=COMMANDS, section=st.sampled_from(SECTIONS), name=IDENTIFIERS.filter(lambda n: n not in KNOWN))
def test_unknown_keys(cli, tmp_path: Path, command: str, section: str, name: str) -> None:
    from clmerge.config import Config

    if section == "" and name in Config.__dataclass_fields__:
        return
    check(cli, tmp_path, command, f"{section}{name}=1")


@pytest.mark.slow
@SETTINGS
@given(command=COMMANDS, key=st.sampled_from(["benchmark.name", "model.name", "merge.method", "finetune.regime",
                                               "benchmark.world.domain", "finetune.precision"]), name=ODD)
def test_odd_characters_in_names(cli, tmp_path: Path, command: str, key: str, name: str) -> None:
    check(cli, tmp_path, command, f"{key}='{name}'")


@pytest.mark.parametrize(("key", "name"), [("benchmark.name", "../../escape"), ("benchmark.name", ".."),
                                           ("benchmark.name", "a b"), ("model.name", "/etc/passwd"),
                                           ("model.name", "a/../../b"), ("model.name", "x;rm -rf")])
def test_names_that_would_leave_the_store_are_refused(cli, tmp_path: Path, key: str, name: str) -> None:
    check(cli, tmp_path, "finetune", f"{key}='{name}'")


@pytest.mark.parametrize(("args", "fragment"), [
    (["merge", "merge.alpha=nan"], "merge.alpha=nan is not a finite number"),
    (["merge", "merge.alpha=-inf"], "merge.alpha=-inf is not a finite number"),
    (["merge", "merge.alpha=true"], "merge.alpha=True is not a finite number"),
    (["eval", "--methods", "magmax", "merge.alpha=nan"], "merge.alpha=nan is not a finite number"),
    (["merge", "merge.alpha=auto", "merge.alpha_grid=[0.5,inf]", "benchmark.world.val_per_class=2"],
     "merge.alpha_grid=[0.5, inf] holds a value that is not a finite number"),
    (["run", "--methods", "dare", "merge.dare.p=1.0"], "merge.dare.p=1.0 is not valid"),
    (["run", "finetune.regime=pam", "eval.methods=[]", "merge.ties.scope=rows"], "merge.ties.scope=rows"),  # PAM's own
    (["eval", "merge.granularity=rows"], "merge.granularity=rows is not valid"),
    (["merge", "-m", "--method", "ties", "merge.ties.k=0.2,2"], "merge.ties.k=2.0 is not valid"),
    (["merge", "merge.alpha=${nope}"], "cannot resolve the interpolation in merge.alpha=${nope}"),
])
def test_bad_merge_settings_fail_before_any_job_runs(cli, tmp_path: Path, args: list[str], fragment: str) -> None:
    result = cli(*args, *TINY, f"paths.store={tmp_path / 'store'}", f"paths.output={tmp_path / 'out'}")
    assert_one_line_error(result, fragment)
    assert files_under(tmp_path) == []


def test_merge_settings_are_not_checked_where_nothing_is_merged(cli, tmp_path: Path) -> None:
    result = cli("eval", "finetune.regime=joint", "merge.dare.p=1.0", *TINY, f"paths.store={tmp_path / 'store'}",
                 f"paths.output={tmp_path / 'out'}")
    assert_one_line_error(result, "nothing is fine-tuned for this config")


def test_export_paths_are_checked_before_the_merge(cli, tmp_path: Path) -> None:
    checkpoint = tmp_path / "store" / "finetune" / "key" / "task_000.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"a checkpoint")
    (tmp_path / "folder.safetensors").mkdir()
    for export, fragment in ((checkpoint, "is inside the checkpoint store"),
                             (tmp_path / "store" / "heads" / "m.safetensors", "is inside the checkpoint store"),
                             (tmp_path / "folder.safetensors", "is a folder; name a file in it"),
                             (tmp_path / "nowhere" / "m.safetensors", "does not exist; create it first"),
                             (tmp_path / "m.pt", "name it *.safetensors")):
        result = cli("merge", "--export", str(export), *TINY, f"paths.store={tmp_path / 'store'}",
                     f"paths.output={tmp_path / 'out'}")
        assert_one_line_error(result, f"--export {export}", fragment)
    assert files_under(tmp_path) == [checkpoint] and checkpoint.read_bytes() == b"a checkpoint"


@pytest.mark.parametrize("key", ["paths.store", "paths.output"])
def test_a_directory_setting_naming_a_file_is_one_line(cli, tmp_path: Path, key: str) -> None:
    file = tmp_path / "a-file"
    file.write_text("x")
    for value, fragment in ((file, "is a file"), (file / "below", f"lies below the file {file}")):
        result = cli("merge", *TINY, f"paths.store={tmp_path / 'store'}", f"paths.output={tmp_path / 'out'}",
                     f"{key}={value}")
        assert_one_line_error(result, f"{key}={value} {fragment}")
    assert files_under(tmp_path) == [file]
