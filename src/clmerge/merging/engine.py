"""The merge engine: the task vectors folded chunk by chunk along their flat index (merging.layout).

Two loop orders give the same bits:

- chunk-major (final only): each chunk of the T task vectors is folded by one fused kernel call (up to
  `GROUP` tasks per call) and written once into the merged vector; memory traffic is one read of every task
  vector plus one write of the merged one, and memory is the merged vector plus a chunk per file;
- task-major (all steps): task t's chunks are folded in turn into the state (one vector; averaging and TIES
  keep more), so all T per-step merges cost one pass over the tasks (O(T), not O(T^2)).

Every fold is one fused kernel per chunk (merging.kernels, parts._fold: TIES trim + the combiner's update,
and a NaN/inf marker checked once per call). The kernels read the task vectors where they lie: views of
the mapped files wherever a chunk's tensors lie end to end as fp32 (merging.reader; the views are never
written: sparsifiers that rewrite whole tensors get copies), else copies read with `preadv`. Each file
drops the pages it has handed out as the merge moves on, and all of them once its task is folded or its
threshold found.
States and outputs are one flat block each, faulted in by a second thread while the merge runs
(merging.memory): the page faults of a fresh vector cost as much as reading five task vectors.

Global TIES trimming first reads a small sample of each task vector to bracket its threshold and one more
full pass to find it exactly (merging.select). Both loop orders find all T thresholds before allocating
their state, on as many threads as torch has. Integer and boolean tensors are never merged: they pass
through from the first task untouched.

Reads are not overlapped with folds on a second thread: inductor's compiled kernels hold the GIL, so a
reader thread only waited on them (docs/performance.md).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterator, Optional, Sequence

import torch

from clmerge.errors import UserError
from clmerge.merging.kernels import MIN_ENTRIES
from clmerge.merging.layout import Layout, Piece
from clmerge.merging.memory import prefaulted, release_freed_heap, sharing_cores
from clmerge.merging.methods import MergeMethod, MergeParams
from clmerge.merging.parts import Combiner, Sparsifier, State, Step, TopK, no_scalars, undecided
from clmerge.merging.reader import check_compatible, check_finite_tensor
from clmerge.merging.select import DIRECT, Bracket, bracket
from clmerge.merging.sources import Source

Tensors = dict[str, torch.Tensor]
SAMPLE_BLOCKS, BLOCK = 1024, 256  # global-threshold sample: about this many blocks of this many entries
ROWS = 1 << 21  # final only: entries per chunk of all the tasks of a group together (8 MB)
GROUP = 16  # final only: tasks per fold call at most (the kernel is compiled once per row count)
TASK_CHUNK = 1 << 20  # all steps: entries per chunk (4 MB)
MAPPED = 32 << 20  # bytes of mapped task-vector pages the files being read keep, together, before dropping them
SMALL_MERGE = 1 << 25  # entries x tasks below which compiling costs more than it saves: eager-sized chunks


def check_finite(vector: Tensors, where: str) -> None:
    """Refuse a vector with NaN/Inf entries, naming `where` and the first bad tensor."""
    for name, tensor in vector.items():
        check_finite_tensor(tensor, where, name)


def _sample_pieces(layout: Layout) -> list[Piece]:
    """The pieces of `SAMPLE_BLOCKS` evenly spaced blocks of `BLOCK` entries (fewer if the vector is short),
    laid end to end: the sample that brackets a global threshold."""
    length = min(layout.total, BLOCK)
    pieces = []
    for i in range(SAMPLE_BLOCKS):
        start = (layout.total - length) * i // (SAMPLE_BLOCKS - 1)
        pieces += [replace(piece, offset=piece.offset + i * length) for piece in layout.pieces(start, length)]
    return pieces


def _global_threshold(source: Source, layout: Layout, topk: TopK, sample: list[Piece], buffer: torch.Tensor,
                      hold: int) -> Optional[float]:
    """thr of one task vector over all its floating tensors (None: keep everything), exact; read chunk by
    chunk (views of the file, or copies into `buffer`; `hold`: see `TensorFile.span`). The `sample` pieces
    are copied (with one read per block): a view would map a whole folio for each."""
    rank = topk.rank(layout.total)
    if rank < 1:
        return None

    def values(begin: int, count: int) -> torch.Tensor:
        return source.span(layout.pieces(begin, count), buffer[:count], hold)

    chunks = list(layout.chunks(buffer.numel(), within_tensors=False))
    if layout.total <= DIRECT:
        return float(torch.cat([values(*chunk).abs() for chunk in chunks]).kthvalue(rank).values)
    size = sample[-1].offset + sample[-1].count
    source.read_span(sample, buffer[:size])
    found = bracket(buffer[:size].abs(), rank, layout.total)
    for chunk in chunks:
        found.scan(values(*chunk))
    picked = found.pick(rank)
    if picked is None:  # unlucky sample: exact fallback over the whole vector
        whole = Bracket(None, None)
        for chunk in chunks:
            whole.scan(values(*chunk))
        picked = whole.pick(rank)
    source.release()
    return picked


def _thresholds(sources: Sequence[Source], layout: Layout, topk: Optional[Sparsifier], width: int
                ) -> list[Optional[float]]:
    """The global trim threshold of each source in task order (None for each without global trimming).

    Each scan reads `width` entries at a time; with n > 1 torch threads, n scans run at once, each thread
    with its own buffer. The scans' freed buffers are then handed back to the OS."""
    if not (isinstance(topk, TopK) and topk.scope == "global"):
        return [None for _ in sources]
    local, workers = threading.local(), torch.get_num_threads()
    sample = _sample_pieces(layout) if layout.total > DIRECT else []

    def scan(source: Source) -> Optional[float]:
        if not hasattr(local, "buffer"):
            local.buffer = torch.empty(max(width, SAMPLE_BLOCKS * BLOCK))
        return _global_threshold(source, layout, topk, sample, local.buffer, MAPPED // workers)

    if workers == 1:
        found = [scan(source) for source in sources]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="clmerge-threshold") as pool:
            found = list(pool.map(scan, sources))
    release_freed_heap()
    return found


class _Plan:
    """How one method folds: how chunks are cut (merging.layout) and the per-task arguments of its kernel."""

    def __init__(self, combiner: Combiner, sparsifier: Optional[Sparsifier], seed: int, num_tasks: int,
                 layout: Layout):
        self.combiner, self.sparsifier, self.seed, self.num_tasks, self.layout = (combiner, sparsifier, seed,
                                                                                  num_tasks, layout)
        per_tensor = isinstance(sparsifier, TopK) and sparsifier.scope == "tensor"
        self.rewrites = sparsifier is not None and not isinstance(sparsifier, TopK)  # DARE rewrites its rows
        self.whole = per_tensor or self.rewrites
        self.within = self.whole or combiner.scalars is not no_scalars
        self.large = layout.total * num_tasks >= SMALL_MERGE  # compiled folds, whatever a chunk's size
        self.cap = layout.total if self.large else MIN_ENTRIES - 1  # chunk size cap

    def chunks(self, size: int) -> list[tuple[int, int, list[Piece]]]:
        """(begin, count, pieces) of every chunk: `size` entries, whole tensors for whole-tensor sparsifiers."""
        return [(begin, count, self.layout.pieces(begin, count))
                for begin, count in self.layout.chunks(None if self.whole else min(size, self.cap), self.within)]

    def fetch(self, source: Source, pieces: list[Piece], out: torch.Tensor, hold: int) -> torch.Tensor:
        """The pieces of one task vector as a flat row: a view of the source where it can give one (no copy;
        `hold`: see `TensorFile.span`), else read into `out`; always `out` for whole-tensor sparsifiers, which
        rewrite their rows in place."""
        if self.whole:
            source.read_span(pieces, out)
            return out
        return source.span(pieces, out, hold)

    def width(self, size: int) -> int:
        """The largest chunk `chunks(size)` cuts."""
        return self.layout.largest if self.whole else max(1, min(size, self.cap, self.layout.total))

    def state(self, entries: int, compact: bool) -> State:
        """An uninitialised flat state: one block, or one per part of a list state."""
        if self.combiner.layout is None:
            return torch.empty(entries)
        return [torch.empty(entries, dtype=dtype) for dtype in self.combiner.layout(self.num_tasks, compact)]

    def arguments(self, rows: list[torch.Tensor], pieces: list[Piece], tasks: range,
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


def _fold_checked(plan: _Plan, state: State, rows: list[torch.Tensor], first: bool, pieces: list[Piece],
                  tasks: range, thresholds: Sequence[Optional[float]], sources: Sequence[Source],
                  out: Optional[torch.Tensor]) -> None:
    """Fold rows (tasks `tasks`) into a slice of the state, and with `out` (for a combiner that finalizes)
    write m_t of the last of those tasks there in the same pass; refuse NaN/Inf, naming the first bad file
    and key. One sum of the state's first part decides (the fold marks bad entries NaN there); only when it
    is not finite does the exact check run over the rows (a finite overflow passes)."""
    finishing = out if plan.combiner.finalize is not None else None
    if plan.rewrites:  # DARE would turn a dropped NaN into 0 before the fold's marker could see it
        _check_rows(rows, pieces, tasks, sources)
    plan.combiner.fold(state, rows, first, *plan.arguments(rows, pieces, tasks, thresholds), finishing, tasks[-1],
                       any_size=plan.large)
    if not math.isfinite(float(_parts(state)[0].sum())):
        _check_rows(rows, pieces, tasks, sources)


def _check_rows(rows: list[torch.Tensor], pieces: list[Piece], tasks: range, sources: Sequence[Source]) -> None:
    """Refuse NaN/Inf in the rows, naming the first bad file and key."""
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


def _election(combiner: Combiner, state: State) -> tuple[int, int]:
    """The TIES majority over a state (or a slice of one), the sum of the elected signs, and how many of its
    entries are `undecided` (exact integers)."""
    assert combiner.elect is not None
    chunk = combiner.elect.chunk(_parts(state)[0].numel())
    majority, undecided_count = 0, 0
    for _, piece in _slices(state, chunk):
        share, count = combiner.elect(piece).tolist()
        majority, undecided_count = majority + share, undecided_count + count
    return majority, undecided_count


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
    buffer = torch.empty(plan.width(TASK_CHUNK))
    with prefaulted(_parts(state) + ([] if out is state else [out])) as faulting:
        for t, threshold in enumerate(thresholds, start=1):
            finishing, majority, undecided_count = every_step or t == num_tasks, 0, 0
            with sharing_cores(faulting) as cores:
                for begin, count, pieces in chunks:
                    cores.settle()
                    part = _slice(state, begin, count)
                    rows = [plan.fetch(sources[t - 1], pieces, buffer[:count], MAPPED)]  # one file at a time
                    _fold_checked(plan, part, rows, t == 1, pieces, range(t, t + 1), [threshold], sources,
                                  out[begin:begin + count] if finishing else None)
                    if finishing and combiner.elect is not None:  # while the chunk is in cache
                        share, count_here = _election(combiner, part)
                        majority, undecided_count = majority + share, undecided_count + count_here
                sources[t - 1].release()
                if finishing and combiner.settle is not None and majority <= 0 and undecided_count:
                    for begin, count, _ in chunks:
                        combiner.settle(_slice(state, begin, count), out[begin:begin + count])
            if finishing:
                yield t, out


def _chunk_major(sources: Sequence[Source], plan: _Plan) -> Iterator[tuple[int, torch.Tensor]]:
    """m_T alone: each chunk of the T task vectors (views, or rows read into a buffer) folded (`GROUP` tasks
    per kernel call) into a chunk-sized state, then finalized into the merged vector."""
    combiner, num_tasks, layout = plan.combiner, plan.num_tasks, plan.layout
    thresholds = _thresholds(sources, layout, plan.sparsifier, plan.width(TASK_CHUNK))
    group = math.ceil(num_tasks / math.ceil(num_tasks / GROUP))
    size = max(ROWS // group, 1)
    size -= size % 1024 if size > 1024 else 0  # chunk starts on cache-line and vector boundaries
    merged = torch.empty(layout.total)
    rows = [torch.empty(plan.width(size)) for _ in range(group)]  # for chunks that are read, not mapped
    in_place = combiner.layout is None and combiner.finalize is None
    scratch = None if in_place else plan.state(plan.width(size), compact=False)
    majority, pending = 0, []
    with prefaulted([merged]) as faulting, sharing_cores(faulting) as cores:
        for begin, count, pieces in plan.chunks(size):
            cores.settle()
            state = merged[begin:begin + count] if in_place else _slice(scratch, 0, count)
            for low in range(0, num_tasks, group):
                tasks = range(low + 1, min(low + group, num_tasks) + 1)
                taken = [plan.fetch(sources[t - 1], pieces, row[:count], MAPPED // num_tasks)
                         for row, t in zip(rows, tasks)]
                _fold_checked(plan, state, taken, low == 0, pieces, tasks, thresholds[low:low + group],
                              sources, merged[begin:begin + count] if tasks[-1] == num_tasks else None)
            if combiner.elect is not None:
                share, undecided_count = _election(combiner, state)
                majority += share
                if undecided_count:
                    index, values = undecided(state)
                    pending.append((index + begin, values))
    if majority <= 0:
        for index, values in pending:
            merged[index] = values
    yield num_tasks, merged


def merge_final(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams()) -> Tensors:
    """m_T alone."""
    return next(merge_steps(sources, method, params, every_step=False))[1]
