"""The operating-system side of the engine's memory (Linux/glibc through ctypes; elsewhere these do nothing).

- `prefaulted`: the first write to each page of a fresh block costs a page fault, 0.17-0.2 s per 345 MB
  task vector on the benchmark VM, as much as reading five task vectors. `madvise(MADV_POPULATE_WRITE)`
  (Linux 5.14+) faults a range in without writing to it, and ctypes releases the GIL around the call, so a
  second thread faults blocks in on another core while the merge runs. Pages the merge reaches first fault
  as usual; no contents change either way.
  While it runs, folds take one torch thread fewer (`sharing_cores`).
- `release_freed_heap`: glibc keeps the heap memory that small allocations freed; `malloc_trim` hands it
  back.
- `FOLIO`: the most one page fault of a file mapping maps at once (a PMD-sized page-cache folio), for
  readers that drop the pages they have read (merging.reader).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

MADV_POPULATE_WRITE = 23  # linux/mman.h, the same on every Linux architecture
SEGMENT = 64 << 20  # bytes faulted in per call, taken from each block in turn


def _pmd_size() -> int:
    """Bytes a PMD maps (2 MiB on x86-64 with 4 KiB pages), from the kernel where it says."""
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


FOLIO = _pmd_size()


def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


_LIBC = _libc()
_MADVISE = getattr(_LIBC, "madvise", None)
if _MADVISE is not None:
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)


def release_freed_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps what small allocations freed (the TIES threshold
    scans' buffers and candidates), and it would sit under the state allocated next."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _pages(block: torch.Tensor) -> tuple[int, int]:
    """(first address, bytes) of the whole pages inside a contiguous block."""
    begin = block.data_ptr()
    end = begin + block.numel() * block.element_size()
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    return first, max(0, end // mmap.PAGESIZE * mmap.PAGESIZE - first)


def _populate(blocks: Sequence[torch.Tensor], stop: threading.Event) -> None:
    """Fault the blocks in, `SEGMENT` bytes of each in turn (the merge writes them side by side), until done
    or stopped."""
    assert _MADVISE is not None
    ranges = [_pages(block) for block in blocks]
    for offset in range(0, max(size for _, size in ranges), SEGMENT):
        for first, size in ranges:
            if stop.is_set():
                return
            if offset < size and _MADVISE(first + offset, min(SEGMENT, size - offset), MADV_POPULATE_WRITE):
                return  # not supported here (Linux < 5.14): the merge faults its pages itself


@contextmanager
def prefaulted(blocks: Sequence[torch.Tensor]) -> Iterator[Optional[threading.Thread]]:
    """Fault fresh contiguous blocks in on a second thread while the body runs; gives the thread (None where
    nothing is faulted in). On exit the thread is told to stop after its current segment and waited for, so
    that no block is freed under it."""
    if _MADVISE is None or not blocks:
        yield None
        return
    stop = threading.Event()
    worker = threading.Thread(target=_populate, args=(list(blocks), stop), name="clmerge-prefault", daemon=True)
    worker.start()
    try:
        yield worker
    finally:
        stop.set()
        worker.join()


class Cores:
    """The torch threads a merge folds on while a prefault thread may run (`sharing_cores`)."""

    def __init__(self, worker: Optional[threading.Thread], threads: int):
        self.worker, self.threads = worker, threads

    def settle(self) -> None:
        """Take the thread back once the prefault thread has finished (between folds; a few microseconds)."""
        if self.worker is not None and not self.worker.is_alive() and torch.get_num_threads() < self.threads:
            torch.set_num_threads(self.threads)


@contextmanager
def sharing_cores(worker: Optional[threading.Thread]) -> Iterator[Cores]:
    """Run the body on one torch thread fewer while the prefault thread `worker` runs (and torch has more than
    one): on 2 cores, a fold's second OpenMP thread and the prefault thread slowed each other down (final-only
    MagMax 0.45-0.50 s at 2 threads against 0.37-0.41 s at 1, alternating runs). The body calls
    `settle()` between folds to take the thread back once the worker is done: the merged vector is faulted
    in long before a final-only random mix or TIES ends. Not across a yield: the caller's own work between
    steps keeps every thread."""
    threads = torch.get_num_threads()
    cores = Cores(worker, threads)
    if worker is None or threads == 1 or not worker.is_alive():
        yield cores
        return
    torch.set_num_threads(threads - 1)
    try:
        yield cores
    finally:
        torch.set_num_threads(threads)
