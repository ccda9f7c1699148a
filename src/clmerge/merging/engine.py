"""The merge engine: one pass over the task vectors, tensor by tensor, yielding m_t after every step.

Task-major fold: task t's tensors are read one at a time into a reused buffer and folded into the
state, so memory is the state (1 vector; TIES 2.5) plus one tensor, whatever the number of tasks, and all
T per-step merges cost one pass (O(T), not O(T^2)). Global TIES trimming first reads a small sample of
each task vector to bracket its threshold and one more full pass to find it exactly (merging.select).
Updates run in place on cache-sized chunks of each tensor; random draws stay per whole tensor.
Integer and boolean tensors are never merged: they pass through from the first task untouched.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from clmerge.errors import UserError
from clmerge.merging.methods import MergeMethod, MergeParams
from clmerge.merging.parts import Combiner, Dare, Sparsifier, Step, TopK
from clmerge.merging.reader import check_compatible, check_finite_tensor
from clmerge.merging.select import DIRECT, Bracket, bracket
from clmerge.merging.sources import Source

Tensors = dict[str, torch.Tensor]
SAMPLE_BLOCKS, BLOCK = 1024, 256  # global-threshold sample: about this many blocks of this many entries
CHUNK = 1 << 16  # entries per update call: the update's temporaries stay in the L2 cache


def check_finite(vector: Tensors, where: str) -> None:
    """Refuse a vector with NaN/Inf entries, naming `where` and the first bad tensor."""
    for name, tensor in vector.items():
        check_finite_tensor(tensor, where, name)


class _Reader:
    """Reads one source's floating tensors as fp32 into one reused buffer (valid until the next read)."""

    def __init__(self, sizes: Sequence[int]):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.largest = max(sizes, default=0)

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(self.largest, dtype=dtype)
        return self.buffers[dtype]

    def read(self, source: Source, name: str, start: int = 0, count: int = -1) -> torch.Tensor:
        tensor = source.read_into(name, self._buffer(source.entries[name].dtype), start, count)
        return tensor if tensor.dtype == torch.float32 else tensor.float()


def _global_threshold(source: Source, names: list[str], topk: TopK, reader: _Reader) -> Optional[float]:
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
    for name in names:
        tau = reader.read(source, name)
        check_finite_tensor(tau, str(source.path), name)
        for (piece,) in _chunks(tau):
            found.scan(piece.abs())
    picked = found.pick(rank)
    if picked is None:  # unlucky sample: exact fallback over the whole vector
        whole = Bracket(None, None)
        for name in names:
            whole.scan(reader.read(source, name).abs())
        picked = whole.pick(rank)
    return picked


def merge_steps(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams(),
                every_step: bool = True) -> Iterator[tuple[int, Tensors]]:
    """Yield (t, m_t) for t = 1..T (only t = T unless `every_step`), folding the sources in task order.

    A yielded vector may share storage with the state: it is valid until the next step; copy what you keep.
    """
    if not sources:
        raise UserError("there are no task vectors to merge; run `clmerge finetune` first")
    check_compatible(list(sources))
    first = sources[0]
    names = [name for name, entry in first.entries.items() if entry.dtype.is_floating_point]
    passthrough = {name: first.read(name) for name, entry in first.entries.items()
                   if not entry.dtype.is_floating_point}
    reader = _Reader([first.entries[name].numel for name in names])
    sparsifier = method.sparsifier(params)
    combiner, num_tasks = method.combiner, len(sources)
    state: dict[str, object] = {}
    out: Tensors = {}  # the merged vector of a step, reused by the next one
    for t, source in enumerate(sources, start=1):
        threshold = (_global_threshold(source, names, sparsifier, reader)
                     if isinstance(sparsifier, TopK) and sparsifier.scope == "global" else None)
        for name in names:
            tau = reader.read(source, name)
            check_finite_tensor(tau, str(source.path), name)
            if isinstance(sparsifier, TopK) and sparsifier.scope == "tensor":
                threshold = sparsifier.tensor_threshold(tau)
            step = Step(name, t, num_tasks, params.seed, threshold)
            if name not in state and combiner.init is not None:
                state[name] = combiner.init(tau, step)
            if name in state and combiner.elementwise and not isinstance(sparsifier, Dare):
                state[name] = _fold_chunks(state[name], tau, step, combiner, sparsifier)
            else:
                state[name] = combiner.update(state.get(name), tau if sparsifier is None else sparsifier(tau, step),
                                              step)
        if every_step or t == num_tasks:
            if combiner.needs_out and not out:
                out = {name: torch.empty(first.entries[name].shape) for name in names}
            yield t, {**_finalize(state, t, combiner, out), **passthrough}


def _chunks(state: object, *others: torch.Tensor) -> Iterator[tuple[object, ...]]:
    """Matching cache-sized slices of a state (tensor or list of tensors) and of other same-sized tensors."""
    parts = state if isinstance(state, list) else [state]
    views = [part.view(-1) for part in parts]
    flats = [other.reshape(-1) for other in others]
    for start in range(0, views[0].numel(), CHUNK):
        chunk = [view[start:start + CHUNK] for view in views]
        yield (chunk if isinstance(state, list) else chunk[0], *(flat[start:start + CHUNK] for flat in flats))


def _finalize(state: dict[str, object], t: int, combiner: Combiner, out: Tensors) -> Tensors:
    """m_t of every tensor (into `out` where the combiner needs it), chunk by chunk where it can."""
    if not combiner.elementwise:
        return {name: combiner.finalize(value, t, 0.0, out.get(name)) for name, value in state.items()}
    majority = 0.0
    if combiner.majority is not None:
        majority = sum(combiner.majority(chunk) for value in state.values() for (chunk,) in _chunks(value))
    merged = {}
    for name, value in state.items():
        if name not in out:
            merged[name] = combiner.finalize(value, t, majority, None)
            continue
        for chunk, target in _chunks(value, out[name]):
            combiner.finalize(chunk, t, majority, target)
        merged[name] = out[name]
    return merged


def _fold_chunks(state: object, tau: torch.Tensor, step: Step, combiner: Combiner,
                 sparsifier: Optional[Sparsifier]) -> object:
    """Update `state` in place chunk by chunk, so that the temporaries of the update stay in cache."""
    for chunk, piece in _chunks(state, tau):
        combiner.update(chunk, piece if sparsifier is None else sparsifier(piece, step), step)
    return state


def merge_final(sources: Sequence[Source], method: MergeMethod, params: MergeParams = MergeParams()) -> Tensors:
    """m_T alone."""
    return next(merge_steps(sources, method, params, every_step=False))[1]
