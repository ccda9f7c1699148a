"""Data parallelism: rank slices partition each global batch in the single-process order, and 2 gloo
processes under torchrun store the task vectors 1 process stores at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_clmerge
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from clmerge.training.batches import ShuffledBatches
from clmerge.training.distributed import GlobalBatches, Shard

# The ranks' gradients are summed in another order than one process sums them; AdamW divides each entry by
# its own running scale, so entries with near-zero gradients amplify that rounding (measured 1.7e-5 at most).
MAX_TOLERANCE = 1e-4  # a fifth of one step's lr (5e-4); task-vector entries reach about 1e-3
MEAN_TOLERANCE = 1e-7


@pytest.mark.parametrize(("batch", "world"), [(8, 2), (7, 3), (2, 4)])
def test_rank_slices_partition_each_global_batch_in_single_process_order(batch: int, world: int) -> None:
    data = TensorDataset(torch.arange(19).float(), torch.arange(19))
    single = [labels.tolist() for _, labels in DataLoader(data, batch_size=batch, shuffle=True,
                                                          generator=torch.Generator().manual_seed(3))]
    ranks = [list(GlobalBatches(data, ShuffledBatches(19, batch, 3, total=len(single)), Shard(r, world)))
             for r in range(world)]
    for step, expected in enumerate(single):
        sizes = {size for rank in ranks for _, _, size in [rank[step]]}
        assert sizes == {len(expected)}
        assert [i for rank in ranks for i in rank[step][1].tolist()] == expected


def _task_vectors(store: Path) -> list[dict[str, torch.Tensor]]:
    (key,) = (store / "finetune").iterdir()
    return [load_file(path) for path in sorted(key.glob("task_*.safetensors"))]


@pytest.mark.slow
def test_two_gloo_processes_store_the_task_vectors_of_one_process(tmp_path: Path) -> None:
    args = [*TINY, "finetune.steps=2", "finetune.device=cpu"]
    single = run_clmerge(["finetune", *args, f"paths.store={tmp_path / 'one'}", f"paths.output={tmp_path / 'o1'}"],
                         tmp_path)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clmerge",
               "finetune", *args, "finetune.distributed=on", f"paths.store={tmp_path / 'two'}",
               f"paths.output={tmp_path / 'o2'}"]
    ddp = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr  # both ranks take rank 0's "complete" and skip, no barrier left
    assert "every task is fine-tuned already" in again.stdout
    one, two = _task_vectors(tmp_path / "one"), _task_vectors(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert max(v.abs().max().item() for v in a.values()) > 1e-4
        diffs = torch.cat([(a[k] - b[k]).abs().reshape(-1) for k in a])
        assert diffs.max().item() < MAX_TOLERANCE and diffs.mean().item() < MEAN_TOLERANCE, (diffs.max(), diffs.mean())
