"""Merge diagnostics for the manifest: sign-conflict rates and MagMax's per-task contribution shares.

One key-major pass: for each tensor, a block of entries of every task vector and of the merge at a time.
A sign conflict between u and v at entry e is u[e] * v[e] < 0 (zeros never conflict); a rate is a count
over all entries of the scope. Layers group tensors by transformer block (`...resblocks.3`), else by module.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from clmerge.merging.sources import Source

BLOCK = 1 << 18  # entries per block; below 2**24, so fp32 matmuls of 0/1 signs count exactly


def layer_of(name: str) -> str:
    """`visual.transformer.resblocks.3.attn.in_proj_weight` -> `visual.transformer.resblocks.3`."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] in ("weight", "bias") else name


class _Counts:
    """Conflict counts of one scope: T x T between tasks, T against the merge, owners (MagMax)."""

    def __init__(self, num_tasks: int):
        self.entries = 0
        self.pairwise = torch.zeros(num_tasks, num_tasks, dtype=torch.int64)
        self.against = torch.zeros(num_tasks, dtype=torch.int64)
        self.owners = torch.zeros(num_tasks, dtype=torch.int64)

    def add(self, other: "_Counts") -> None:
        self.entries += other.entries
        self.pairwise += other.pairwise
        self.against += other.against
        self.owners += other.owners

    def rates(self, owners: bool) -> dict[str, object]:
        scale = 1.0 / max(self.entries, 1)
        found: dict[str, object] = {
            "entries": self.entries,
            "pairwise": [[round(float(c) * scale, 6) for c in row] for row in self.pairwise],
            "against_merge": [round(float(c) * scale, 6) for c in self.against]}
        if owners:
            found["contribution_share"] = [round(float(c) * scale, 6) for c in self.owners]
        return found


def _block_counts(taus: torch.Tensor, merged: torch.Tensor, owners: bool) -> _Counts:
    """Counts of one block: taus [T, B], merged [B]."""
    counts = _Counts(taus.shape[0])
    counts.entries = taus.shape[1]
    positive, negative = (taus > 0).float(), (taus < 0).float()
    cross = positive @ negative.T
    counts.pairwise = (cross + cross.T).round().long()
    counts.against = (positive @ (merged < 0).float() + negative @ (merged > 0).float()).round().long()
    if owners:  # k(e) = the LAST task of largest |tau| (MagMax's tie rule)
        last = taus.shape[0] - 1 - taus.abs().flip(0).argmax(0)
        counts.owners = torch.bincount(last, minlength=taus.shape[0])
    return counts


def diagnostics(sources: Sequence[Source], merged: dict[str, torch.Tensor], owners: bool) -> dict[str, object]:
    """Overall and per-layer sign-conflict rates (and contribution shares if `owners`, for MagMax)."""
    first = sources[0]
    names = [name for name, entry in first.entries.items() if entry.dtype.is_floating_point]
    per_layer: dict[str, _Counts] = defaultdict(lambda: _Counts(len(sources)))
    for name in names:
        entry = first.entries[name]
        flat = merged[name].reshape(-1).float()
        for start in range(0, entry.numel, BLOCK):
            count = min(BLOCK, entry.numel - start)
            scratch = torch.empty(count, dtype=entry.dtype)
            taus = torch.empty(len(sources), count)
            for i, source in enumerate(sources):
                taus[i].copy_(source.read_into(name, scratch, start, count).reshape(-1))
            per_layer[layer_of(name)].add(_block_counts(taus, flat[start:start + count], owners))
    total = _Counts(len(sources))
    for counts in per_layer.values():
        total.add(counts)
    return {"definition": "rate = |{e : u[e] * v[e] < 0}| / entries (zeros never conflict)",
            **total.rates(owners), "per_layer": {layer: c.rates(owners) for layer, c in per_layer.items()}}
