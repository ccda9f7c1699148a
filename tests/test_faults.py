"""Fault injection on the real `clmerge` command (slow): SIGKILL at random points and inside file writes,
SIGTERM, a full disk, two writers on one store key, a joblib multirun over a shared store and a store the
user may only read.

Every test ends by comparing the task vectors with an uninterrupted run's (sha256, hence bit for bit) and
by `verify_store`. The SIGKILL test prints where its kills landed (`-s`); docs/reliability.md has the counts.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from clmerge.store_verify import verify_store

pytestmark = pytest.mark.slow

TINY = ["finetune.steps=8", "finetune.batch_size=16", "benchmark.world.train_per_class=20",
        "benchmark.world.test_per_class=5", "benchmark.num_tasks=3", "threads=1"]
KILLS = 24


def command(store: Path, out: Path, *args: str) -> list[str]:
    clmerge = str(Path(sys.executable).with_name("clmerge"))
    return [clmerge, "finetune", *TINY, f"paths.store={store}", f"paths.output={out}", *args]


def start(store: Path, out: Path, *args: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command(store, out, *args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)


def task_hashes(store: Path) -> dict[str, str]:
    [key] = (store / "finetune").iterdir()
    files = json.loads((key / "manifest.json").read_text())["files"]
    return {name: record["sha256"] for name, record in files.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], float]:
    """The file hashes of an uninterrupted run, and how long it took."""
    tmp = tmp_path_factory.mktemp("reference")
    begin = time.monotonic()
    process = start(tmp / "store", tmp / "out")
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    return task_hashes(tmp / "store"), time.monotonic() - begin


def wait_for_write(process: subprocess.Popen, store: Path, nth: int) -> bool:
    """Poll until the `nth` store write seen in progress (a temporary file appears) or the process ends (False)."""
    seen, writing = 0, False
    while process.poll() is None:
        now = any(store.glob("finetune/*/.tmp-*"))
        seen += now and not writing
        writing = now
        if seen >= nth:
            return True
        time.sleep(0.0005)
    return False


def progress(store: Path) -> str:
    """What the store holds: finished tasks and the step checkpoint, e.g. '2 tasks + task 3 step 4'."""
    keys = list(store.glob("finetune/*/manifest.json"))
    if not keys:
        return "nothing"
    files = json.loads(keys[0].read_text())["files"]
    done = sum(name.startswith("task_") for name in files)
    steps = [name for name in files if name.startswith("resume-")]
    return f"{done} tasks" + (f" + step checkpoint {steps[0].split('-step_')[1].split('.')[0]}" if steps else "")


def test_sigkill_at_random_points_loses_nothing_and_ends_bit_identical(
        reference: tuple[dict[str, str], float], tmp_path: Path) -> None:
    expected, duration = reference
    rng = random.Random(0)
    kills: Counter[str] = Counter()  # where the kill landed
    states: Counter[str] = Counter()  # what the store held when it did
    campaigns = 0
    while sum(kills.values()) < KILLS:
        campaigns += 1
        store, out = tmp_path / f"store{campaigns}", tmp_path / f"out{campaigns}"
        while True:  # kill, rerun, ... until a run finishes
            in_write = sum(kills.values()) % 2 == 0
            process = start(store, out, "finetune.checkpoint_every=2")
            if in_write:
                hit = wait_for_write(process, store, nth=rng.randint(1, 8))
            else:
                try:
                    process.wait(timeout=rng.uniform(0.2, 1.0) * duration)
                except subprocess.TimeoutExpired:
                    pass
                hit = process.poll() is None
            if not hit:
                _, stderr = process.communicate(timeout=900)
                assert process.returncode == 0, stderr
                break
            before = progress(store)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
            kills["inside a file write" if in_write else "at a random time"] += 1
            states[before] += 1
            if store.exists():
                verdict = verify_store(store)
                assert verdict.intact, verdict.damaged
        assert task_hashes(store) == expected
        assert verify_store(store).intact
        assert not list(store.glob("finetune/*/resume-*")) and not list(store.glob("finetune/*/.tmp-*"))
    print(f"\n{sum(kills.values())} kills in {campaigns} campaigns: {dict(kills)}; store states: {dict(states)}")


def test_sigterm_saves_a_step_checkpoint_exits_143_and_the_rerun_is_bit_identical(
        reference: tuple[dict[str, str], float], tmp_path: Path) -> None:
    expected, _ = reference
    store, out = tmp_path / "store", tmp_path / "out"
    process = start(store, out)
    while not list(store.glob("finetune/*/manifest.json")):  # theta_0 stored: training is about to start
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: stopped by SIGTERM after step ") and "Traceback" not in stderr
    assert "rerun the same command to resume" in lines[-1]
    assert list(store.glob("finetune/*/resume-task_*.safetensors"))
    rerun = start(store, out)
    _, stderr = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, stderr
    assert task_hashes(store) == expected


def test_a_full_disk_ends_with_one_line_and_marks_nothing_complete(tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "out"

    def small_files() -> None:  # a file-size limit stands in for a full disk: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))

    process = start(store, out, preexec_fn=small_files)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and "base.safetensors: File too large; free disk space" in line
    [key] = (store / "finetune").iterdir()
    assert sorted(p.name for p in key.iterdir()) == [".lock"]  # no partial file, no manifest
    assert verify_store(store).intact


def test_two_writers_on_one_key_wait_for_each_other(reference: tuple[dict[str, str], float],
                                                    tmp_path: Path) -> None:
    expected, _ = reference
    store, out = tmp_path / "store", tmp_path / "out"
    first, second = start(store, out), start(store, out)
    results = [process.communicate(timeout=900) for process in (first, second)]
    assert (first.returncode, second.returncode) == (0, 0), results
    logs = [log.read_text() for log in out.glob("finetune/*/finetune.log")]
    assert any("waiting for another clmerge process writing" in log for log in logs)  # one log if started in one second
    assert task_hashes(store) == expected
    assert verify_store(store).intact


def test_a_joblib_multirun_over_a_shared_store_key_gives_intact_results(tmp_path: Path) -> None:
    store, out = tmp_path / "store", tmp_path / "out"
    clmerge = str(Path(sys.executable).with_name("clmerge"))
    args = [clmerge, "run", "-m", "merge.alpha=0.3,0.5", "hydra/launcher=local", "eval.methods=[magmax]",
            "model.pretrained=none", "benchmark.num_tasks=2", "finetune.steps=3", "finetune.batch_size=8",
            "benchmark.world.train_per_class=4", "benchmark.world.test_per_class=3", "threads=1",
            f"paths.store={store}", f"paths.output={out}"]
    result = subprocess.run(args, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    documents = [json.loads(p.read_text()) for p in sorted(out.glob("multirun/run/*/*/results.json"))]
    assert sorted(d["methods"]["magmax"]["alpha"] for d in documents) == [0.3, 0.5]
    assert len({d["store"]["finetune"] for d in documents}) == 1  # both jobs used one key
    assert len(list((store / "finetune").iterdir())) == 1
    assert verify_store(store).intact


# root without the capabilities that bypass permission bits: a user to whom a chmod a-w store is read-only
AS_ANOTHER_USER = ["setpriv", "--inh-caps=-dac_override,-dac_read_search,-fowner",
                   "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_read_only_store_serves_run_on_a_finished_run_and_refuses_new_work_in_one_line(
        reference: tuple[dict[str, str], float], tmp_path: Path) -> None:
    expected, _ = reference
    store, out = tmp_path / "store", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    assert subprocess.run(command(store, out), env=env, capture_output=True, timeout=900).returncode == 0
    before = sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*"))
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    try:
        clmerge = str(Path(sys.executable).with_name("clmerge"))
        run = [*AS_ANOTHER_USER, clmerge, "run", "--methods", "magmax", *TINY, f"paths.store={store}",
               f"paths.output={out}"]
        result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr
        log = result.stdout + result.stderr
        assert log.count("zero-shot heads are not cached, but computed when needed") == 1
        assert len(list(out.glob("run/*/results.json"))) == 1
        new_key = subprocess.run([*AS_ANOTHER_USER, *command(store, out, "seed=1")], env=env, capture_output=True,
                                 text=True, timeout=900)
        assert new_key.returncode == 2
        [line] = new_key.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot create {store / 'finetune'}/") and ": Permission denied; " in line
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)
    assert sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*")) == before
    assert task_hashes(store) == expected and verify_store(store).intact
