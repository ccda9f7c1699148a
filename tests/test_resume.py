"""Mid-task resume: batch order from any step, step checkpoints, SIGTERM, damaged checkpoints, NaN loss."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_pipeline import tiny_cfg
from torch.utils.data import DataLoader, TensorDataset

from clmerge import pipeline
from clmerge.config import Config
from clmerge.errors import PREEMPTED_EXIT, Preempted, UserError
from clmerge.store import finetune_dir, task_file
from clmerge.training.batches import ShuffledBatches
from clmerge.training.resume import TaskCheckpoints, checkpoint_file

QUIET = Console(quiet=True)


@pytest.mark.parametrize(("size", "batch_size", "total"), [(10, 4, 9), (12, 4, 7), (5, 8, 4), (7, 1, 20)])
def test_batches_follow_the_dataloader_shuffle_and_start_anywhere(size: int, batch_size: int, total: int) -> None:
    loader = DataLoader(TensorDataset(torch.arange(size)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(7))
    expected: list[list[int]] = []
    while len(expected) < total:
        expected.extend(batch.tolist() for (batch,) in loader)
    expected = expected[:total]
    assert list(ShuffledBatches(size, batch_size, 7, total)) == expected
    for start in range(total + 1):
        assert list(ShuffledBatches(size, batch_size, 7, total, start)) == expected[start:]


def task_hashes(path: Path) -> dict[str, str]:
    files = json.loads((path / "manifest.json").read_text())["files"]
    return {name: record["sha256"] for name, record in files.items()}


def small(tmp_path: Path, **finetune: object) -> Config:
    """3 tasks of 3 steps over 16 images each, in batches of 6: resumes land mid-epoch."""
    cfg = tiny_cfg(tmp_path)
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, steps=3, batch_size=6, **finetune))


def with_store(cfg: Config, store: Path, **finetune: object) -> Config:
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, store=str(store)),
                               finetune=dataclasses.replace(cfg.finetune, **finetune))


def sigterm_at(monkeypatch: pytest.MonkeyPatch, task: int, step: int) -> None:
    """Deliver a real SIGTERM to this process right after optimizer step `step` of task `task` (0-based)."""
    original = TaskCheckpoints.after_step

    def after_step(self: TaskCheckpoints, current: int, *args: object) -> None:
        if (self.task, current) == (task, step):
            signal.raise_signal(signal.SIGTERM)
        original(self, current, *args)

    monkeypatch.setattr(TaskCheckpoints, "after_step", after_step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[str, str]]:
    """An uninterrupted run (3 tasks of 3 steps) and the sha256 of its files."""
    cfg = small(tmp_path_factory.mktemp("reference"))
    return cfg, task_hashes(pipeline.finetune(cfg, QUIET))


def test_sigterm_saves_a_step_checkpoint_and_the_rerun_is_bit_identical(
        reference: tuple[Config, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, expected = reference
    cfg = with_store(cfg, tmp_path / "store")
    sigterm_at(monkeypatch, task=1, step=2)
    with pytest.raises(Preempted) as caught:
        pipeline.finetune(cfg, QUIET)
    assert caught.value.exit_code == PREEMPTED_EXIT == 143
    store = finetune_dir(cfg)
    name = checkpoint_file(1, 2)
    assert str(caught.value) == (f"stopped by SIGTERM after step 2/3 of task 2; saved {store.path / name}; "
                                 "rerun the same command to resume")
    assert sorted(store.manifest["files"]) == ["base.safetensors", name, task_file(0)]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
    monkeypatch.undo()
    resumed = pipeline.finetune(cfg, QUIET)
    assert task_hashes(resumed) == expected  # bit-identical task vectors, no step checkpoint left
    assert not list(resumed.glob("resume-*"))


def test_periodic_checkpoints_keep_only_the_latest_and_resume_bit_identically(
        reference: tuple[Config, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, expected = reference
    cfg = with_store(cfg, tmp_path / "store", checkpoint_every=1)
    assert finetune_dir(cfg).path.name == finetune_dir(reference[0]).path.name  # not part of the store key
    original = TaskCheckpoints.after_step

    def crash_after(self: TaskCheckpoints, step: int, *args: object) -> None:
        original(self, step, *args)
        if (self.task, step) == (2, 2):
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(TaskCheckpoints, "after_step", crash_after)
    with pytest.raises(RuntimeError):
        pipeline.finetune(cfg, QUIET)
    store = finetune_dir(cfg)
    assert [n for n in store.manifest["files"] if n.startswith("resume-")] == [checkpoint_file(2, 2)]
    monkeypatch.undo()
    assert task_hashes(pipeline.finetune(cfg, QUIET)) == expected


def test_a_damaged_step_checkpoint_is_reported_and_never_used(
        reference: tuple[Config, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg, expected = reference
    cfg = with_store(cfg, tmp_path / "store")
    sigterm_at(monkeypatch, task=0, step=1)
    with pytest.raises(Preempted):
        pipeline.finetune(cfg, QUIET)
    monkeypatch.undo()
    file = finetune_dir(cfg).path / checkpoint_file(0, 1)
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="clmerge.training.resume"):
        path = pipeline.finetune(cfg, QUIET)
    assert f"{file} does not match its sha256" in caplog.text and "task 1 starts over" in caplog.text
    assert task_hashes(path) == expected and not file.exists()


def test_a_nan_loss_stops_the_task_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = small(tmp_path, checkpoint_every=1, lr=1e30, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(UserError, match=r"the loss became (nan|inf) at step \d; nothing of this step was saved"):
        pipeline.finetune(cfg, QUIET)
    files = finetune_dir(cfg).manifest["files"]
    assert task_file(0) not in files
    kept = [name for name in files if name.startswith("resume-")]
    assert len(kept) == 1 and all(torch.isfinite(t).all() for t in finetune_dir(cfg).load(kept[0]).values())
