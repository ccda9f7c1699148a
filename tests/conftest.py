"""Shared fixtures: offline hub, and a store and output directory of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

# Before anything imports open_clip or huggingface_hub: nothing may be downloaded (SPEC.md section 7).
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]

# A fine-tuning budget of a few seconds: random tiny CLIP, 2 tasks, 2 images per class, 1 step per task.
TINY = ["model.pretrained=none", "benchmark.num_tasks=2", "benchmark.world.train_per_class=2",
        "benchmark.world.test_per_class=2", "finetune.steps=1", "finetune.warmup_steps=1",
        "finetune.batch_size=8", "eval.batch_size=64", "threads=1"]


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """Overrides that keep the store and the run outputs in the test's tmp_path."""
    return [f"paths.store={tmp_path / 'store'}", f"paths.output={tmp_path / 'outputs'}"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Invoke `clmerge ARGS...` in-process from tmp_path; returns the click Result (stdout, stderr apart)."""
    from clmerge.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def run_clmerge(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -W error -m`-style run of the real entry point in a fresh process (warnings are errors)."""
    code = "import sys; from clmerge.cli import app; sys.argv[0] = 'clmerge'; app()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-W", "error", "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def files_under(path: Path) -> list[Path]:
    """Every regular file below `path` (empty when it does not exist)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread (two threads only wait on each other on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
