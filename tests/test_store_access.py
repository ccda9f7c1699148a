"""Store access: file modes follow the umask; paths that cannot be written or read are one-line errors naming
them; a complete fine-tuning run needs no lock, so a read-only store serves `run` and `eval`."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import SafetensorError
from test_pipeline import QUIET, tiny_cfg
from test_store import make_cfg

from clmerge import pipeline
from clmerge import store as store_module
from clmerge.errors import UserError
from clmerge.merging.alpha import AlphaCurve
from clmerge.merging.job import record_auto
from clmerge.store import (BASE_FILE, CheckpointDir, NotWritable, atomic_save_tensors, finetune_dir, merge_dir,
                           task_file)
from clmerge.store_verify import verify_store

VECTOR = {"visual.w": torch.arange(8.0)}


def saved_store(tmp_path: Path) -> CheckpointDir:
    store = finetune_dir(make_cfg(tmp_path))
    store.save(BASE_FILE, VECTOR, role="theta_0")
    store.save(task_file(0), VECTOR, task="task1")
    return store


def refuse_open(monkeypatch: pytest.MonkeyPatch, path: Path, error: OSError, module: ModuleType = store_module) -> None:
    """Make `module`'s `open` of `path` raise `error` (as permission bits would for another user than root)."""
    def guarded_open(file: object, *args: object, **kwargs: object):
        if str(file) == str(path):
            raise error
        return open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", guarded_open, raising=False)  # that module's calls only


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)], ids=["022", "027", "002"])
def test_store_files_get_the_mode_of_ordinary_files_under_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    before = os.umask(mask)
    try:
        store = saved_store(tmp_path)
        with store.lock():
            pass
        atomic_save_tensors(tmp_path / "export.safetensors", VECTOR)  # merge --export and the heads cache
    finally:
        os.umask(before)
    files = [store.path / name for name in (BASE_FILE, task_file(0), "manifest.json", ".lock")]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}
    assert oct(stat.S_IMODE((tmp_path / "export.safetensors").stat().st_mode)) == oct(mode)


@pytest.mark.parametrize("target, error, reason, fix", [
    ("save_file", SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) at path "x"'),
     "Permission denied", "give this user write permission to {key}"),
    ("save_file", SafetensorError('Error while serializing: I/O error: Read-only file system (os error 30) at '
                                  'path "x"'), "Read-only file system", "mount it writable"),
    ("replace", PermissionError(errno.EPERM, "Operation not permitted"), "Operation not permitted",
     "give this user write permission to {key}"),
], ids=["rust-EACCES", "rust-EROFS", "rename-EPERM"])
def test_a_store_that_refuses_a_write_is_one_line_and_keeps_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, error: Exception, reason: str, fix: str) -> None:
    store = saved_store(tmp_path)
    before = (store.path / "manifest.json").read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(store_module if target == "save_file" else store_module.os, target, fail)
    with pytest.raises(NotWritable) as caught:
        store.save(task_file(1), VECTOR)
    file = store.path / task_file(1)
    assert str(caught.value) == (f"cannot write {file}: {reason}; {fix.format(key=store.path)} or set paths.store / "
                                 "paths.output to a writable folder")
    assert sorted(p.name for p in store.path.iterdir()) == sorted([BASE_FILE, task_file(0), "manifest.json"])
    assert (store.path / "manifest.json").read_bytes() == before


def test_a_lock_that_cannot_be_created_is_one_line_and_best_effort_writers_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointDir(tmp_path / "merge" / "magmax-1", {})
    refuse_open(monkeypatch, store.path / ".lock", PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(NotWritable, match=f"^cannot write {re.escape(str(store.path / '.lock'))}: Permission denied; "
                                          f"give this user write permission to {re.escape(str(store.path))} or"):
        with store.lock():
            pass
    curve = AlphaCurve([0.5, 1.0], [0.25, 0.5], 1.0)  # merge.alpha=auto's curve is kept only where it can be
    with caplog.at_level("WARNING"):
        assert record_auto(store, curve) == {"alpha_auto": curve.to_json()}
    assert "could not keep the merge.alpha=auto curve" in caplog.text
    assert not (store.path / "manifest.json").exists()


def test_a_key_folder_that_cannot_be_created_names_the_folder_to_open_up(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    root.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if Path(str(path)).parent == root:  # the store root refuses new folders, as a read-only store does
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    store = merge_dir(make_cfg(tmp_path), "magmax", {})
    with pytest.raises(NotWritable) as caught:
        store.save("final.safetensors", VECTOR)
    assert str(caught.value) == (f"cannot create {store.path}: Permission denied; give this user write permission "
                                 f"to {root} or set paths.store / paths.output to a writable folder")


def test_a_file_or_folder_in_the_way_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("a file where the store folder should be")
    store = finetune_dir(make_cfg(tmp_path))
    with pytest.raises(UserError, match=f"^cannot create {re.escape(str(store.path))}: Not a directory "
                                        r"\(a file or folder is in the way\); move it away"):
        store.save(task_file(0), VECTOR)
    key = CheckpointDir(tmp_path / "key", {})
    (key.path / ".lock").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^cannot write .*/key/\.lock: Is a directory \(a file or folder"):
        with key.lock():
            pass


def test_a_folder_in_place_of_a_store_file_is_one_line_naming_it(tmp_path: Path) -> None:
    store = saved_store(tmp_path)
    file = store.path / task_file(0)
    file.unlink()
    file.mkdir()
    expected = f"^cannot read {re.escape(str(file))}: Is a directory; give this user read permission to it, or delete"
    for read in (store.load, store.verified_path):
        with pytest.raises(UserError, match=expected):
            read(task_file(0))
    manifest = store.path / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    with pytest.raises(UserError, match=f"^cannot read {re.escape(str(manifest))}: Is a directory"):
        CheckpointDir(store.path, {})
    verdict = verify_store(tmp_path / "store")
    assert verdict.damaged == [f"cannot read {manifest}: Is a directory; give this user read permission to it, or "
                               "delete it and rerun the command that wrote it"]


def test_a_file_this_user_may_not_read_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = saved_store(tmp_path)
    file = store.path / task_file(0)
    refuse_open(monkeypatch, file, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(UserError, match=f"^cannot read {re.escape(str(file))}: Permission denied; give this user"):
        store.load(task_file(0))
    verdict = verify_store(tmp_path / "store")
    assert verdict.files == 2 and len(verdict.damaged) == 1
    assert verdict.damaged[0].startswith(f"cannot read {file}: Permission denied")


def test_verify_names_a_key_whose_lock_it_may_not_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clmerge import store_verify

    store = saved_store(tmp_path)
    with store.lock():
        pass
    lock = store.path / ".lock"
    refuse_open(monkeypatch, lock, PermissionError(errno.EACCES, "Permission denied", str(lock)), store_verify)
    verdict = verify_store(tmp_path / "store")
    assert verdict.damaged == [f"{lock}: cannot be read (Permission denied); give this user read permission to it"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a complete tiny fine-tuning run (copied by each test)."""
    tmp = tmp_path_factory.mktemp("finished")
    pipeline.finetune(tiny_cfg(tmp), QUIET)
    return tmp / "store"


def test_a_complete_run_is_checked_without_taking_its_lock(finished_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(finished_run, tmp_path / "store")
    cfg = tiny_cfg(tmp_path)
    path = finetune_dir(cfg).path
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in path.iterdir()}

    def read_only(self: CheckpointDir, wait: bool = True) -> None:
        raise NotWritable(f"cannot write {self.path / '.lock'}: Read-only file system")

    monkeypatch.setattr(CheckpointDir, "lock", read_only)
    assert pipeline.finetune(cfg, QUIET) == path
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in path.iterdir()} == before
    store = finetune_dir(cfg)  # theta_0 is still checked against the pretrained weights
    store.save(BASE_FILE, {k: v + 1 for k, v in store.load(BASE_FILE).items()}, role="theta_0")
    with pytest.raises(UserError, match="the pretrained weights differ"):
        pipeline.finetune(cfg, QUIET)


def test_a_run_with_work_left_takes_the_lock_and_an_unwritable_store_is_one_line(
        finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(finished_run, tmp_path / "store")
    cfg = tiny_cfg(tmp_path)
    store = finetune_dir(cfg)
    del store.manifest["files"][task_file(2)]  # the last task is not finished: there is work to do
    store.write_manifest()
    refuse_open(monkeypatch, store.path / ".lock", OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(NotWritable, match=f"^cannot write {re.escape(str(store.path / '.lock'))}: Read-only file "
                                          "system; mount it writable or set paths.store"):
        pipeline.finetune(cfg, QUIET)
    assert task_file(2) not in finetune_dir(cfg).manifest["files"]
