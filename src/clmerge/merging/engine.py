"""The merge engine: one pass over the task vectors, tensor by tensor, yielding m_t after every step.

Every step, per tensor, is one fused kernel (merging.kernels: TIES trim + the combiner's update in one pass
over memory). Two loop orders give the same bits:

- task-major (all steps; final only for one-tensor states): task t's tensors are read one at a time and
  folded into the state, so memory is the state (1 vector; TIES 2.5) plus two tensor buffers, and all T
  per-step merges cost one pass (O(T), not O(T^2));
- tensor-major (TIES final only): each tensor is read from the T files in turn and folded into a state
  of one tensor's size with fp32 counts (fast to update, stays in cache); memory is the merged vector plus
  that state. For one-tensor states (MagMax, sums, random mix) this order measured slower here
  (docs/performance.md), so they stay task-major.

Reads run one tensor ahead on a second thread (merging.stream); states and outputs are one huge-page
block each (merging.memory).

Global TIES trimming first reads a small sample of each task vector to bracket its threshold and one more
full pass to find it exactly (merging.select). For the final-only merge, with more than one torch thread,
these threshold scans run ahead on that many threads, overlapping each other; the all-steps merge scans
one task at a time (each scan holds buffers and candidates, and that path's state is already 3.5 task
vectors). Integer and boolean tensors are never merged: they pass through from the first task untouched.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterable, Iterator, Optional, Sequence

import torch

from clmerge.errors import UserError
from clmerge.merging.memory import carve
from clmerge.merging.methods import MergeMethod, MergeParams
from clmerge.merging.parts import Combiner, Sparsifier, State, Step, TopK, trim, undecided
from clmerge.merging.reader import check_compatible, check_finite_tensor
from clmerge.merging.select import DIRECT, Bracket, bracket
from clmerge.merging.sources import Source
from clmerge.merging.stream import Reader

Tensors = dict[str, torch.Tensor]
SAMPLE_BLOCKS, BLOCK = 1024, 256  # global-threshold sample: about this many blocks of this many entries


def check_finite(vector: Tensors, where: str) -> None:
    """Refuse a vector with NaN/Inf entries, naming `where` and the first bad tensor."""
    for name, tensor in vector.items():
        check_finite_tensor(tensor, where, name)


def _global_threshold(source: Source, names: list[str], topk: TopK, reader: Reader) -> Optional[float]:
    """thr of one task vector over all its floating tensors (None: keep everything), exact."""
    sizes = {name: source.entries[name].numel for name in names}
    total = sum(sizes.values())
    rank = topk.rank(total)
    if rank < 1:
        return None
    if total <= DIRECT:
        values = torch.cat([reader.read(source, name).abs().reshape(-1) for name in names])
        return float(values.kthvalue(rank).values)
    samples = []
    for name, size in sizes.items():
        blocks = max(1, round(SAMPLE_BLOCKS * size / total))
        length = min(size, BLOCK)
        for i in range(blocks):
            start = (size - length) * i // max(blocks - 1, 1)
            samples.append(reader.read(source, name, start, length).abs())
    found = bracket(torch.cat(samples), rank, total)
    for tau in reader.stream((source, name) for name in names):
        found.scan(tau, magnitudes=True)
    picked = found.pick(rank)
    if picked is None:  # unlucky sample: exact fallback over the whole vector
        whole = Bracket(None, None)
        for name in names:
            whole.scan(reader.read(source, name), magnitudes=True)
        picked = whole.pick(rank)
    return picked


def _thresholds(sources: Sequence[Source], names: list[str], topk: Optional[Sparsifier], ahead: bool
                ) -> Iterator[Optional[float]]:
    """The global trim threshold of each source in task order (None for each without global trimming).

    `ahead` with n > 1 torch threads: n scans run ahead in a pool, each thread with its own reader; the
    caller goes on meanwhile. Otherwise they run in turn, when asked for."""
    if not (isinstance(topk, TopK) and topk.scope == "global"):
        yield from (None for _ in sources)
        return
    sizes = [sources[0].entries[name].numel for name in names]
    workers = torch.get_num_threads() if ahead else 1
    if workers == 1:
        reader = Reader(sizes)
        yield from (_global_threshold(source, names, topk, reader) for source in sources)
        return
    local = threading.local()

    def scan(source: Source) -> Optional[float]:
        if not hasattr(local, "reader"):
            local.reader = Reader(sizes)
        return _global_threshold(source, names, topk, local.reader)

    with ThreadPoolExecutor(workers, thread_name_prefix="clmerge-threshold") as pool:
        for future in [pool.submit(scan, source) for source in sources]:
            yield future.result()


def _parts(state: State) -> list[torch.Tensor]:
    return state if isinstance(state, list) else [state]


class _Folder:
    """Folds one tensor of one task into its (preallocated) state: sparsify, then the fused trim + update
    kernel; at t = 1 a list state is zeroed first, a tensor state becomes a copy of tau-hat_1."""

    def __init__(self, combiner: Combiner, sparsifier: Optional[Sparsifier]):
        self.combiner, self.sparsifier = combiner, sparsifier

    def __call__(self, state: State, tau: torch.Tensor, step: Step) -> None:
        threshold = step.threshold
        if isinstance(self.sparsifier, TopK):
            if self.sparsifier.scope == "tensor":
                threshold = self.sparsifier.tensor_threshold(tau)
        elif self.sparsifier is not None:
            tau = self.sparsifier(tau, step)
        if step.t == 1 and not isinstance(state, list):
            state.view(-1).copy_(trim(tau, threshold).reshape(-1))
            return
        if step.t == 1:
            for part in state:
                part.zero_()
        fold, flat = self.combiner.fold, tau.reshape(-1)
        chunk = fold.chunk(flat.numel())
        for start, piece in _slices(state, chunk):
            fold(piece, flat[start:start + chunk], threshold, *self.combiner.scalars(replace(step, start=start)))

    def allocate(self, shapes: dict[str, tuple[int, ...]], num_tasks: int, compact: bool) -> dict[str, State]:
        """Uninitialised states for tensors of these shapes, each part one block."""
        if self.combiner.layout is None:
            return carve(shapes)
        blocks = [carve(shapes, dtype) for dtype in self.combiner.layout(num_tasks, compact)]
        return {name: [views[name] for views in blocks] for name in shapes}


def _slices(state: State, chunk: int) -> Iterator[tuple[int, State]]:
    """(start, matching flat slices of every part of a state), `chunk` entries at a time."""
    flats = [part.view(-1) for part in _parts(state)]
    for start in range(0, flats[0].numel(), chunk):
        piece = [flat[start:start + chunk] for flat in flats]
        yield start, piece if isinstance(state, list) else piece[0]


def _finalize(combiner: Combiner, state: State, t: int, out: torch.Tensor) -> torch.Tensor:
    """m_t of one tensor: the state itself, or finalize(state) written into `out`."""
    if combiner.finish is None:
        return state
    target, chunk = out.view(-1), combiner.finish.chunk(out.numel())
    for start, piece in _slices(state, chunk):
        combiner.finish(piece, t, target[start:start + chunk])
    return out


def _majority(combiner: Combiner, states: Iterable[State]) -> int:
    """The TIES majority over these tensors' states: sum of the elected signs (exact integers)."""
    assert combiner.elect is not None
    total = 0
    for state in states:
        chunk = combiner.elect.chunk(_parts(state)[0].numel())
        total += sum(int(combiner.elect(piece)) for _, piece in _slices(state, chunk))
    return total


def _elect(merged: Tensors, majority: int, pending: Iterable[tuple[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Where the elected sign was 0, the negative candidate (parts.undecided), unless the majority is positive."""
    if majority <= 0:
        for name, (index, values) in pending:
            merged[name].view(-1)[index] = values


def merge_steps(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams(),
                every_step: bool = True) -> Iterator[tuple[int, Tensors]]:
    """Yield (t, m_t) for t = 1..T (only t = T unless `every_step`), folding the sources in task order.

    A yielded vector may share storage with the state: it is valid until the next step; copy what you keep.
    """
    if not sources:
        raise UserError("there are no task vectors to merge; run `clmerge finetune` first")
    check_compatible(list(sources))
    first = sources[0]
    shapes = {name: entry.shape for name, entry in first.entries.items() if entry.dtype.is_floating_point}
    passthrough = {name: first.read(name) for name, entry in first.entries.items()
                   if not entry.dtype.is_floating_point}
    reader = Reader([first.entries[name].numel for name in shapes])
    fold = _Folder(method.combiner, method.sparsifier(params))
    if every_step or method.combiner.layout is None:
        steps = _task_major(sources, shapes, fold, params.seed, reader, every_step)
    else:
        steps = _tensor_major(sources, shapes, fold, params.seed, reader)
    for t, merged in steps:
        yield t, {**merged, **passthrough}


def _task_major(sources: Sequence[Source], shapes: dict[str, tuple[int, ...]], fold: _Folder, seed: int,
                reader: Reader, every_step: bool) -> Iterator[tuple[int, Tensors]]:
    """m_1..m_T (m_T alone unless `every_step`): each task vector folded into the whole state in turn."""
    combiner, num_tasks, names = fold.combiner, len(sources), list(shapes)
    state = fold.allocate(shapes, num_tasks, compact=True)
    out = carve(shapes) if combiner.finish is not None else {}  # reused by every step
    thresholds = _thresholds(sources, names, fold.sparsifier, ahead=False)
    for t, (source, threshold) in enumerate(zip(sources, thresholds), start=1):
        for name, tau in zip(names, reader.stream((source, name) for name in names)):
            fold(state[name], tau, Step(name, t, num_tasks, seed, threshold))
        if not (every_step or t == num_tasks):
            continue
        merged = {name: _finalize(combiner, value, t, out.get(name)) for name, value in state.items()}
        if combiner.elect is not None:
            _elect(merged, _majority(combiner, state.values()),
                   ((name, undecided(value)) for name, value in state.items()))
        yield t, merged


def _tensor_major(sources: Sequence[Source], shapes: dict[str, tuple[int, ...]], fold: _Folder, seed: int,
                  reader: Reader) -> Iterator[tuple[int, Tensors]]:
    """m_T alone for a list state (TIES): each tensor folded over the T tasks into one reused state of the
    largest tensor's size, then finalized into the merged vector."""
    combiner, num_tasks, names = fold.combiner, len(sources), list(shapes)
    thresholds = list(_thresholds(sources, names, fold.sparsifier, ahead=True))
    merged = carve(shapes)
    largest = max(math.prod(shape) for shape in shapes.values())
    scratch = fold.allocate({"": (largest,)}, num_tasks, compact=False)[""]
    majority, pending = 0, {}
    taus = reader.stream((source, name) for name in names for source in sources)
    for name in names:
        state = [part[:merged[name].numel()] for part in scratch]
        for t, threshold in enumerate(thresholds, start=1):
            fold(state, next(taus), Step(name, t, num_tasks, seed, threshold))
        _finalize(combiner, state, num_tasks, merged[name])
        if combiner.elect is not None:
            majority += _majority(combiner, [state])
            pending[name] = undecided(state)
    _elect(merged, majority, pending.items())
    yield num_tasks, merged


def merge_final(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams()) -> Tensors:
    """m_T alone."""
    return next(merge_steps(sources, method, params, every_step=False))[1]
