"""The engine's memory through the OS: fresh blocks faulted in on a second thread without a change to their
contents, and the pages of mapped task vectors dropped as a scan moves on (Linux: both use madvise)."""

from __future__ import annotations

import mmap
import platform
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clmerge.merging import engine, memory
from clmerge.merging.engine import merge_steps
from clmerge.merging.layout import Layout
from clmerge.merging.memory import prefaulted, sharing_cores
from clmerge.merging.methods import METHODS
from clmerge.merging.reader import TensorFile
from clmerge.merging.sources import open_sources

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
MB = 1 << 20


def resident(kind: str) -> int:
    """This process's resident memory of one kind (RssAnon, RssFile), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {kind} in /proc/self/status")


def kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


@pytest.mark.skipif(not kernel_at_least(5, 14), reason="MADV_POPULATE_WRITE came with Linux 5.14")
def test_prefaulted_blocks_are_resident_after_and_keep_their_contents() -> None:
    written = torch.arange(4 * MB, dtype=torch.float32)  # 16 MB, touched: its contents must survive
    blocks = [torch.empty(16 * MB, dtype=torch.float32), torch.empty(16 * MB, dtype=torch.uint8), written]
    before = resident("RssAnon")
    with prefaulted(blocks):
        pass
    assert resident("RssAnon") - before >= 60 * MB  # the fresh 64 MB block (mapped, never written) is in memory
    assert torch.equal(written, torch.arange(4 * MB, dtype=torch.float32))


def test_folds_leave_a_core_to_a_running_prefault_thread_and_get_it_back() -> None:
    threads, release = torch.get_num_threads(), threading.Event()
    running = threading.Thread(target=release.wait)
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()
    running.start()
    try:
        torch.set_num_threads(3)
        with sharing_cores(running) as cores:
            assert torch.get_num_threads() == 2
            cores.settle()  # the worker still runs: the thread stays with it
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        with pytest.raises(RuntimeError), sharing_cores(running):  # given back when the body fails too
            raise RuntimeError("fold failed")
        assert torch.get_num_threads() == 3
        for worker in (finished, None):  # nothing to share with
            with sharing_cores(worker):
                assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        with sharing_cores(running):  # one thread is never taken away
            assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        with sharing_cores(running) as cores:  # settle takes the thread back once the worker is done
            assert torch.get_num_threads() == 1
            release.set()
            running.join()
            cores.settle()
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        release.set()
        running.join()
        torch.set_num_threads(threads)


def test_merges_fold_on_one_thread_fewer_while_prefaulting_and_yield_with_all(monkeypatch: pytest.MonkeyPatch
                                                                           ) -> None:
    monkeypatch.setattr(memory, "_populate", lambda blocks, stop: stop.wait())  # faulting until the merge ends
    folds: list[int] = []
    fold = engine._fold_checked
    monkeypatch.setattr(engine, "_fold_checked", lambda *args: (folds.append(torch.get_num_threads()), fold(*args)))
    vectors = [{"w": torch.randn(4096, generator=torch.Generator().manual_seed(t))} for t in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for name in ("magmax", "ties"):
            for every_step in (True, False):
                folds.clear()
                steps = merge_steps(open_sources(vectors), METHODS[name], every_step=every_step)
                assert [torch.get_num_threads() for _ in steps] == ([3, 3, 3] if every_step else [3])
                assert folds and set(folds) == {2}
    finally:
        torch.set_num_threads(threads)


def test_a_final_merge_folds_on_every_thread_once_its_prefault_thread_ends(monkeypatch: pytest.MonkeyPatch
                                                                          ) -> None:
    release = threading.Event()
    monkeypatch.setattr(memory, "_populate", lambda blocks, stop: release.wait())  # faulting until released
    monkeypatch.setattr(engine, "ROWS", 1024)  # several chunks
    folds: list[int] = []
    fold = engine._fold_checked

    def counted(*args: object) -> None:
        folds.append(torch.get_num_threads())
        fold(*args)
        release.set()  # the prefault thread ends after the first fold, before the second
        for thread in threading.enumerate():
            if thread.name == "clmerge-prefault":
                thread.join()

    monkeypatch.setattr(engine, "_fold_checked", counted)
    vectors = [{"w": torch.randn(8192, generator=torch.Generator().manual_seed(t))} for t in range(3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        merged = dict(merge_steps(open_sources(vectors), METHODS["magmax"], every_step=False))[3]["w"]
        assert folds[0] == 1 and folds[-1] == 2 and len(folds) >= 4
        expected = vectors[0]["w"]
        for vector in vectors[1:]:
            expected = torch.where(vector["w"].abs() >= expected.abs(), vector["w"], expected)
        assert torch.equal(merged, expected)  # the same bits on either thread count
    finally:
        release.set()
        torch.set_num_threads(threads)


def test_mapped_pages_are_dropped_as_the_spans_move_on(tmp_path: Path) -> None:
    vector = torch.randn(16 * MB)  # 64 MB, in the page cache once written
    save_file({"w": vector}, str(tmp_path / "v.safetensors"))
    layout, out = Layout({"w": vector.shape}), torch.empty(MB // 4)
    grown = {}
    for hold in (MB, 1 << 40):
        with TensorFile(tmp_path / "v.safetensors") as file:
            before, total = resident("RssFile"), 0.0
            for begin in range(0, layout.total, out.numel()):
                total += float(file.span(layout.pieces(begin, out.numel()), out, hold).sum())
            grown[hold] = resident("RssFile") - before
        assert total == pytest.approx(float(vector.sum()), rel=1e-3, abs=1.0)
    assert grown[1 << 40] >= 48 * MB  # kept mapped: most of the file is resident in this process
    assert grown[MB] <= 12 * MB  # dropped every MB: a few MB and a folio or two


def test_a_file_that_cannot_be_mapped_is_read_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vector = torch.randn(1000)
    save_file({"w": vector}, str(tmp_path / "v.safetensors"))

    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with TensorFile(tmp_path / "v.safetensors") as file:
        out = torch.zeros(1000)
        assert file.span(Layout({"w": (1000,)}).pieces(0, 1000), out, hold=0).data_ptr() == out.data_ptr()
        assert torch.equal(out, vector)
