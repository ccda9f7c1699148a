"""The merge engine: the task vectors folded chunk by chunk along their flat index (merging.layout).

Two loop orders give the same bits:

- chunk-major (final only): each chunk is read from the T files into rows that stay in the cache and folded
  by one fused kernel call (up to `GROUP` tasks per call), then written once into the merged vector; memory
  traffic is one read of every task vector plus one write of the merged one, and memory is the merged vector
  plus the rows;
- task-major (all steps): task t's chunks are read in turn and folded into the state (one vector; averaging
  and TIES keep more), so all T per-step merges cost one pass over the tasks (O(T), not O(T^2)).

Every fold is one fused kernel per chunk (merging.kernels, parts._fold: TIES trim + the combiner's update,
and a NaN/inf marker checked once per call). Chunks are read with one `preadv` per file wherever the
tensors lie end to end (merging.reader); states and outputs are one flat block each.

Global TIES trimming first reads a small sample of each task vector to bracket its threshold and one more
full pass to find it exactly (merging.select). Both loop orders find all T thresholds before allocating
their state, on as many threads as torch has. Integer and boolean tensors are never merged: they pass
through from the first task untouched.

Reads are not overlapped with folds on a second thread: inductor's compiled kernels hold the GIL, so a
reader thread only waited on them (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence

import torch

from clmerge.errors import UserError
from clmerge.merging.kernels import MIN_ENTRIES
from clmerge.merging.layout import Layout, Piece
from clmerge.merging.methods import MergeMethod, MergeParams
from clmerge.merging.parts import Combiner, Sparsifier, State, Step, TopK, no_scalars, undecided
from clmerge.merging.reader import check_compatible, check_finite_tensor
from clmerge.merging.select import DIRECT, Bracket, bracket
from clmerge.merging.sources import Source

Tensors = dict[str, torch.Tensor]
SAMPLE_BLOCKS, BLOCK = 1024, 256  # global-threshold sample: about this many blocks of this many entries
ROWS = 1 << 21  # final only: entries of the rows read per chunk (8 MB, all tasks of a group: cache-resident)
GROUP = 16  # final only: tasks per fold call at most (the kernel is compiled once per row count)
TASK_CHUNK = 1 << 20  # all steps: entries per chunk (4 MB)
SMALL_MERGE = 1 << 25  # entries x tasks below which compiling costs more than it saves: eager-sized chunks


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release_freed_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps what small allocations freed (the threshold
    scans' marks and candidates: up to 140 MB measured after a few merges), and it would sit under the
    state allocated next."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def check_finite(vector: Tensors, where: str) -> None:
    """Refuse a vector with NaN/Inf entries, naming `where` and the first bad tensor."""
    for name, tensor in vector.items():
        check_finite_tensor(tensor, where, name)


def _global_threshold(source: Source, layout: Layout, topk: TopK, buffer: torch.Tensor) -> Optional[float]:
    """thr of one task vector over all its floating tensors (None: keep everything), exact; read chunk by
    chunk into `buffer`."""
    rank = topk.rank(layout.total)
    if rank < 1:
        return None

    def values(begin: int, count: int) -> torch.Tensor:
        view = buffer[:count]
        source.read_span(layout.pieces(begin, count), view)
        return view

    chunks = list(layout.chunks(buffer.numel(), within_tensors=False))
    if layout.total <= DIRECT:
        return float(torch.cat([values(*chunk).abs() for chunk in chunks]).kthvalue(rank).values)
    length = min(layout.total, BLOCK)
    starts = ((layout.total - length) * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS))
    found = bracket(torch.cat([values(start, length).abs() for start in starts]), rank, layout.total)
    for chunk in chunks:
        found.scan(values(*chunk), magnitudes=True)
    picked = found.pick(rank)
    if picked is None:  # unlucky sample: exact fallback over the whole vector
        whole = Bracket(None, None)
        for chunk in chunks:
            whole.scan(values(*chunk), magnitudes=True)
        picked = whole.pick(rank)
    return picked


def _thresholds(sources: Sequence[Source], layout: Layout, topk: Optional[Sparsifier], width: int
                ) -> list[Optional[float]]:
    """The global trim threshold of each source in task order (None for each without global trimming).

    Each scan reads `width` entries at a time; with n > 1 torch threads, n scans run at once, each thread
    with its own buffer. The scans' freed buffers are then handed back to the OS."""
    if not (isinstance(topk, TopK) and topk.scope == "global"):
        return [None for _ in sources]
    local = threading.local()

    def scan(source: Source) -> Optional[float]:
        if not hasattr(local, "buffer"):
            local.buffer = torch.empty(width)
        return _global_threshold(source, layout, topk, local.buffer)

    workers = torch.get_num_threads()
    if workers == 1:
        found = [scan(source) for source in sources]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="clmerge-threshold") as pool:
            found = list(pool.map(scan, sources))
    _release_freed_heap()
    return found


class _Plan:
    """How one method folds: how chunks are cut (merging.layout) and the per-task arguments of its kernel."""

    def __init__(self, combiner: Combiner, sparsifier: Optional[Sparsifier], seed: int, num_tasks: int,
                 layout: Layout):
        self.combiner, self.sparsifier, self.seed, self.num_tasks, self.layout = (combiner, sparsifier, seed,
                                                                                  num_tasks, layout)
        per_tensor = isinstance(sparsifier, TopK) and sparsifier.scope == "tensor"
        self.whole = per_tensor or (sparsifier is not None and not isinstance(sparsifier, TopK))
        self.within = self.whole or combiner.scalars is not no_scalars
        self.cap = MIN_ENTRIES - 1 if layout.total * num_tasks < SMALL_MERGE else layout.total  # chunk size cap

    def chunks(self, size: int) -> list[tuple[int, int, list[Piece]]]:
        """(begin, count, pieces) of every chunk: `size` entries, whole tensors for whole-tensor sparsifiers."""
        return [(begin, count, self.layout.pieces(begin, count))
                for begin, count in self.layout.chunks(None if self.whole else min(size, self.cap), self.within)]

    def width(self, size: int) -> int:
        """The largest chunk `chunks(size)` cuts."""
        return self.layout.largest if self.whole else max(1, min(size, self.cap, self.layout.total))

    def state(self, entries: int, compact: bool) -> State:
        """An uninitialised flat state: one block, or one per part of a list state."""
        if self.combiner.layout is None:
            return torch.empty(entries)
        return [torch.empty(entries, dtype=dtype) for dtype in self.combiner.layout(self.num_tasks, compact)]

    def arguments(self, rows: torch.Tensor, pieces: list[Piece], tasks: range,
                  thresholds: Sequence[Optional[float]]) -> tuple[tuple, tuple]:
        """(thresholds, scalars) per row for the fold kernel; whole-tensor rows are sparsified in place."""
        name, start = (pieces[0].name, pieces[0].start) if self.within else ("", 0)
        trims, scalars = [], []
        for row, t, threshold in zip(rows, tasks, thresholds):
            step = Step(name, t, self.num_tasks, self.seed, threshold, start)
            if isinstance(self.sparsifier, TopK) and self.whole:
                threshold = self.sparsifier.tensor_threshold(row)
            elif self.whole:
                row.copy_(self.sparsifier(row, step))
            trims.append(threshold)
            scalars.append(self.combiner.scalars(step))
        return tuple(trims), tuple(scalars)


def _slice(state: State, begin: int, count: int) -> State:
    if isinstance(state, list):
        return [part[begin:begin + count] for part in state]
    return state[begin:begin + count]


def _fold_checked(plan: _Plan, state: State, rows: torch.Tensor, first: bool, pieces: list[Piece],
                  tasks: range, thresholds: Sequence[Optional[float]], sources: Sequence[Source],
                  out: Optional[torch.Tensor]) -> None:
    """Fold rows (tasks `tasks`) into a slice of the state, and with `out` (for a combiner that finalizes)
    write m_t of the last of those tasks there in the same pass; refuse NaN/Inf, naming the first bad file
    and key. One sum of the state's first part decides (the fold marks bad entries NaN there); only when it
    is not finite does the exact check run over the rows (a finite overflow passes)."""
    finishing = out if plan.combiner.finalize is not None else None
    plan.combiner.fold(state, rows, first, *plan.arguments(rows, pieces, tasks, thresholds), finishing, tasks[-1])
    if math.isfinite(float(_parts(state)[0].sum())):
        return
    for row, t in zip(rows, tasks):
        for piece in pieces:
            check_finite_tensor(row[piece.offset:piece.offset + piece.count], str(sources[t - 1].path), piece.name)


def _parts(state: State) -> list[torch.Tensor]:
    return state if isinstance(state, list) else [state]


def _slices(state: State, chunk: int) -> Iterator[tuple[int, State]]:
    """(start, matching flat slices of every part of a state), `chunk` entries at a time."""
    flats = [part.view(-1) for part in _parts(state)]
    for start in range(0, flats[0].numel(), chunk):
        piece = [flat[start:start + chunk] for flat in flats]
        yield start, piece if isinstance(state, list) else piece[0]


def _majority(combiner: Combiner, state: State) -> int:
    """The TIES majority over a state (or a slice of one): sum of the elected signs (exact integers)."""
    assert combiner.elect is not None
    chunk = combiner.elect.chunk(_parts(state)[0].numel())
    return sum(int(combiner.elect(piece)) for _, piece in _slices(state, chunk))


def merge_steps(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams(),
                every_step: bool = True) -> Iterator[tuple[int, Tensors]]:
    """Yield (t, m_t) for t = 1..T (only t = T unless `every_step`), folding the sources in task order.

    A yielded vector may share storage with the state: it is valid until the next step; copy what you keep.
    """
    if not sources:
        raise UserError("there are no task vectors to merge; run `clmerge finetune` first")
    check_compatible(list(sources))
    first = sources[0]
    layout = Layout({name: entry.shape for name, entry in first.entries.items() if entry.dtype.is_floating_point})
    passthrough = {name: first.read(name) for name, entry in first.entries.items()
                   if not entry.dtype.is_floating_point}
    plan = _Plan(method.combiner, method.sparsifier(params), params.seed, len(sources), layout)
    steps = _task_major(sources, plan, every_step) if every_step else _chunk_major(sources, plan)
    for t, merged in steps:
        yield t, {**layout.views(merged), **passthrough}


def _task_major(sources: Sequence[Source], plan: _Plan, every_step: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """m_1..m_T (m_T alone unless `every_step`), flat: each task vector folded into the whole state in turn."""
    combiner, num_tasks, layout = plan.combiner, plan.num_tasks, plan.layout
    thresholds = _thresholds(sources, layout, plan.sparsifier, plan.width(TASK_CHUNK))  # before the state exists
    state = plan.state(layout.total, compact=True)
    out = torch.empty(layout.total) if combiner.finalize is not None else state  # reused by every step
    chunks = plan.chunks(TASK_CHUNK)
    buffer = torch.empty(1, plan.width(TASK_CHUNK))
    for t, threshold in enumerate(thresholds, start=1):
        finishing, majority = every_step or t == num_tasks, 0
        for begin, count, pieces in chunks:
            rows, part = buffer[:, :count], _slice(state, begin, count)
            sources[t - 1].read_span(pieces, rows[0])
            _fold_checked(plan, part, rows, t == 1, pieces, range(t, t + 1), [threshold], sources,
                          out[begin:begin + count] if finishing else None)
            if finishing and combiner.elect is not None:  # while the chunk is in cache
                majority += _majority(combiner, part)
        if not finishing:
            continue
        if combiner.settle is not None and majority <= 0:
            for begin, count, _ in chunks:
                combiner.settle(_slice(state, begin, count), out[begin:begin + count])
        yield t, out


def _chunk_major(sources: Sequence[Source], plan: _Plan) -> Iterator[tuple[int, torch.Tensor]]:
    """m_T alone: each chunk read from the T files into cache-resident rows, folded (`GROUP` tasks per kernel
    call) into a chunk-sized state, then finalized into the merged vector."""
    combiner, num_tasks, layout = plan.combiner, plan.num_tasks, plan.layout
    thresholds = _thresholds(sources, layout, plan.sparsifier, plan.width(TASK_CHUNK))
    group = math.ceil(num_tasks / math.ceil(num_tasks / GROUP))
    size = max(ROWS // group, 1)
    size -= size % 1024 if size > 1024 else 0  # chunk starts on cache-line and vector boundaries
    merged = torch.empty(layout.total)
    rows = torch.empty(group, plan.width(size))
    in_place = combiner.layout is None and combiner.finalize is None
    scratch = None if in_place else plan.state(rows.shape[1], compact=False)
    majority, pending = 0, []
    for begin, count, pieces in plan.chunks(size):
        state = merged[begin:begin + count] if in_place else _slice(scratch, 0, count)
        for low in range(0, num_tasks, group):
            tasks = range(low + 1, min(low + group, num_tasks) + 1)
            taken = rows[:len(tasks), :count]
            for row, t in zip(taken, tasks):
                sources[t - 1].read_span(pieces, row)
            _fold_checked(plan, state, taken, low == 0, pieces, tasks, thresholds[low:low + group], sources,
                          merged[begin:begin + count] if tasks[-1] == num_tasks else None)
        if combiner.elect is not None:
            majority += _majority(combiner, state)
            index, values = undecided(state)
            pending.append((index + begin, values))
    if majority <= 0:
        for index, values in pending:
            merged[index] = values
    yield num_tasks, merged


def merge_final(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams()) -> Tensors:
    """m_T alone."""
    return next(merge_steps(sources, method, params, every_step=False))[1]
