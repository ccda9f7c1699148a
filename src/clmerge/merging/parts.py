"""The parts merge methods are built from (as in mergekit): sparsifiers and combiners.

A sparsifier maps one task vector tensor tau_t to tau-hat_t (trim, random drop); a combiner is a left fold
over tau-hat_1..tau-hat_t in task order with a small state, and `finalize` gives the merged m_t. Each
runs tensor by tensor. A combiner's `update` is elementwise and in place on its state, so it can run on
any slice of a tensor, and its `fold` kernel (TIES trim + update) is fused into one pass (merging.kernels).
The deployed model is theta_0 + lambda * m (SPEC.md sections 1-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch

from clmerge.data.registry import derived_seed
from clmerge.merging.kernels import Kernel
from clmerge.merging.select import kth_smallest_magnitude

State = Any  # a tensor, or a list of tensors (TIES)
HALF = 0x7FFFFFFF  # random mix keys are fed to int32 arithmetic 31 bits at a time


@dataclass(frozen=True)
class Step:
    """Where a fold is: tensor `name`, task t (1-based) of `num_tasks`, run seed, trim threshold, and the
    offset of the slice being folded within the tensor (random mix draws by entry index)."""

    name: str
    t: int
    num_tasks: int
    seed: int = 0
    threshold: Optional[float] = None
    start: int = 0


def generator(seed: int, purpose: str, name: str, t: int) -> torch.Generator:
    """One CPU generator per (run seed, purpose, tensor name, task): draws do not depend on run order."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, name, t))


# ------------------------------------------------------------------------------------------ sparsifiers


def trim(tau: torch.Tensor, threshold: Optional[float]) -> torch.Tensor:
    """TIES trim: tau where |tau| >= threshold, else 0 (None keeps everything)."""
    return tau if threshold is None else torch.where(tau.abs() >= threshold, tau, 0.0)


@dataclass(frozen=True)
class TopK:
    """TIES trim (Yadav et al., NeurIPS 2023, arXiv 2306.01708), SPEC.md 2.2.

    k_keep = floor(k * N_ref); thr = the (N - k_keep)-th smallest |tau| of the N entries of the scope;
    tau-hat = tau where |tau| >= thr, else 0 (ties at thr kept; k_keep >= N keeps all). Scope `global`:
    one thr over the whole vector, N_ref = `denominator` or N; `tensor`: one per tensor, N_ref = its numel.
    """

    k: float = 0.2
    scope: str = "global"
    denominator: Optional[int] = None

    def rank(self, entries: int) -> int:
        """N - k_keep for a scope of `entries` entries (< 1: keep everything)."""
        reference = self.denominator if (self.scope == "global" and self.denominator) else entries
        return entries - math.floor(self.k * reference)

    def tensor_threshold(self, tau: torch.Tensor) -> Optional[float]:
        """thr of one tensor on its own (scope `tensor`); None keeps everything."""
        rank = self.rank(tau.numel())
        return kth_smallest_magnitude(tau, rank) if rank >= 1 else None

    def __call__(self, tau: torch.Tensor, step: Step) -> torch.Tensor:
        """Trim with the threshold of the scope, which the engine puts in `step.threshold`."""
        return trim(tau, step.threshold)


@dataclass(frozen=True)
class Dare:
    """DARE (Yu et al., ICML 2024, arXiv 2311.03099): drop each entry with probability p, rescale the rest.

    tau-hat[e] = tau[e] / (1 - p) with probability 1 - p, else 0 (one generator per seed, tensor, task).
    """

    p: float = 0.5

    def __call__(self, tau: torch.Tensor, step: Step) -> torch.Tensor:
        keep = torch.rand(tau.shape, generator=generator(step.seed, "dare", step.name, step.t)) >= self.p
        return torch.where(keep, tau / (1.0 - self.p), 0.0)


Sparsifier = Callable[[torch.Tensor, Step], torch.Tensor]


# ------------------------------------------------------------------------------------------ combiners


def no_scalars(step: Step) -> tuple[()]:
    """The update needs nothing but the state and tau."""
    return ()


def magmax_update(state: torch.Tensor, tau: torch.Tensor) -> None:
    """MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322): per entry, the signed value of largest |tau|.

    m_1 = tau_1;  m_t = where(|tau_t| >= |m_{t-1}|, tau_t, m_{t-1})  (">=": ties go to the latest task).
    """
    state.copy_(torch.where(tau.abs() >= state.abs(), tau, state))


def sum_update(state: torch.Tensor, tau: torch.Tensor) -> None:
    """Running sum S_t = S_{t-1} + tau_t."""
    state.add_(tau)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit integers (int32 tensors, multiplication wrapping mod 2**32, `>>` logical):
    two rounds of x = ((x >> 16) ^ x) * 0x45d9f3b, then (x >> 16) ^ x. int32 so that it vectorises."""
    x = (((x >> 16) & 0xFFFF) ^ x) * 0x45D9F3B
    x = (((x >> 16) & 0xFFFF) ^ x) * 0x45D9F3B
    return ((x >> 16) & 0xFFFF) ^ x


def uniform24(low: int, high: int, start: int, count: int) -> torch.Tensor:
    """Integers in [0, 2**24) for entries start..start+count-1 of a tensor: the top 24 bits of
    mix32(mix32(e ^ low) ^ high), e the flat entry index, (low, high) two 31-bit halves of a key;
    u = uniform24 / 2**24 is U[0, 1) at fp32's resolution."""
    index = torch.arange(start, start + count, dtype=torch.int32)
    return (mix32(mix32(index ^ low) ^ high) >> 8) & 0xFFFFFF


def random_mix_scalars(step: Step) -> tuple[int, int, int, int]:
    """(low, high, start, limit): bits 0-30 and 31-61 of key = derived_seed(seed, "random_mix", tensor
    name, t); take tau_t where u < 1/t, i.e. where uniform24 < limit = ceil(2**24 / t)."""
    key = derived_seed(step.seed, "random_mix", step.name, step.t)
    return key & HALF, key >> 31 & HALF, step.start, -(-(1 << 24) // step.t)


def random_mix_update(state: torch.Tensor, tau: torch.Tensor, low: int, high: int, start: int,
                      limit: int) -> None:
    """Random mix: m[e] = tau_{r_e}[e], r_e ~ Uniform{1..t}, by reservoir sampling (SPEC.md 2.1).

    m_1 = tau_1;  m_t = where(u < 1/t, tau_t, m_{t-1}), u = uniform24(...)/2**24 per entry: a counter-based
    hash of (run seed, tensor, t, entry index), so any slice can be drawn on its own, in one fused pass.
    """
    take = uniform24(low, high, start, tau.numel()).view(tau.shape) < limit
    state.copy_(torch.where(take, tau, state))


def pairwise_mean_update(state: torch.Tensor, tau: torch.Tensor) -> None:
    """PAM's merge (Sokar et al., arXiv 2506.03189): m_1 = tau_1;  m_t = (m_{t-1} + tau_t) / 2."""
    state.copy_((state + tau) * 0.5)


def last_update(state: torch.Tensor, tau: torch.Tensor) -> None:
    """Sequential fine-tuning baseline: m_t = tau_t, i.e. deploy theta_t itself (lambda 1)."""
    state.copy_(tau)


def disjoint_layout(num_tasks: int, compact: bool) -> list[torch.dtype]:
    """TIES state, all zeros before the first task: S+, S- (fp32), C+, C- (counts: uint8 while T <= 255 when
    `compact`, else fp32, exact up to 2**24 and several times faster to update)."""
    count = torch.float32 if not compact else torch.uint8 if num_tasks <= 255 else torch.int32
    return [torch.float32, torch.float32, count, count]


def disjoint_update(state: list[torch.Tensor], tau: torch.Tensor) -> None:
    """TIES streaming state: S+ += max(tau,0), S- += min(tau,0), C+ += [tau > 0], C- += [tau < 0]."""
    positive, negative, n_positive, n_negative = state
    positive.add_(tau.clamp_min(0.0))
    negative.add_(tau.clamp_max(0.0))
    n_positive.copy_(n_positive.float() + (tau > 0).float())  # via fp32: vectorises, unlike uint8 adds
    n_negative.copy_(n_negative.float() + (tau < 0).float())


def _tied(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Where s = sign(S+ + S-) = 0 and the two candidates differ (S- != 0): the entries whose value the
    global majority decides."""
    return (positive + negative == 0) & (negative != 0)


def disjoint_majority(state: list[torch.Tensor]) -> torch.Tensor:
    """This slice's share of the global majority sign, sum_e sign(S+ + S-), and how many of its entries are
    `undecided` (an int32 pair, exact for slices under 2**31 entries; one pass). int32, not int64: AVX2 has
    no float-to-int64 conversion, and the int64 sums took 3x as long."""
    return torch.stack([torch.sign(state[0] + state[1]).to(torch.int32).sum(dtype=torch.int32),
                        _tied(state[0], state[1]).to(torch.int32).sum(dtype=torch.int32)])


def mean_finalize(state: torch.Tensor, t: int, out: torch.Tensor) -> None:
    """Weight averaging: m = (1/t) * S_t, the mean of the fine-tuned weights (the reference's order)."""
    out.copy_(state * (1.0 / t))


def disjoint_finalize(state: list[torch.Tensor], t: int, out: torch.Tensor) -> None:
    """TIES elect + disjoint mean, where s = sign(S+ + S-) = 0 counts as positive: m = S+ / max(C+, 1) where
    s >= 0, else S- / max(C-, 1). The engine then overwrites the `undecided` entries when the global majority
    sign (the sum of s over the whole vector) is not positive: s = 0 then selects the negatives (SPEC 2.2)."""
    positive, negative, n_positive, n_negative = state
    chosen = positive + negative >= 0
    out.copy_(torch.where(chosen, positive / n_positive.clamp_min(1), negative / n_negative.clamp_min(1)))


def disjoint_negatives(state: list[torch.Tensor], out: torch.Tensor) -> None:
    """The `undecided` entries of a finalized `out` set to their negative candidate S- / max(C-, 1) in place,
    elementwise (no index list): for a whole-vector state once its majority turns out not positive."""
    positive, negative, _, n_negative = state
    out.copy_(torch.where(_tied(positive, negative), negative / n_negative.clamp_min(1), out))


def undecided(state: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The `_tied` entries as flat indices, with S- / max(C-, 1) there: the entries to overwrite once the
    whole vector's majority turns out not positive."""
    positive, negative, _, n_negative = (part.reshape(-1) for part in state)
    index = _tied(positive, negative).nonzero().squeeze(1)
    return index, negative[index] / n_negative[index].clamp_min(1)


def _fold(update: Callable[..., None], finalize: Optional[Callable[..., None]], zero_start: bool, state: State,
          rows: list[torch.Tensor], first: bool, thresholds: tuple[Optional[float], ...], scalars: tuple[tuple, ...],
          out: Optional[torch.Tensor] = None, t: int = 0) -> None:
    """Fold rows[0..R-1] (one slice of tau_t for R consecutive tasks) into the same slice of the state, with
    the TIES trim fused in: update(state, trim(row, threshold), *scalars) per row. `first`: the fold starts
    here (a list state from zeros, a tensor state as a copy of the first trimmed row). With `out`, also
    finalize(state, t, out) in the same pass.

    Where any row has a NaN or inf entry, the state's first part becomes NaN (MagMax alone would drop a
    NaN: |NaN| >= x is false), so one finiteness check of that part after the call covers every row."""
    finite = rows[0] * 0.0
    for index in range(len(rows)):
        tau = trim(rows[index], thresholds[index])
        if index:
            finite = finite + rows[index] * 0.0
        if first and index == 0:
            if not zero_start:
                state.copy_(tau)
                continue
            for part in state:
                part.zero_()
        update(state, tau, *scalars[index])
    head = state[0] if zero_start else state
    head.copy_(torch.where(finite == 0.0, head, math.nan))
    if out is not None and finalize is not None:
        finalize(state, t, out)


@dataclass(frozen=True)
class Combiner:
    """A fold: `update(state, tau-hat, *scalars(step))` per task, elementwise and in place (so it runs on
    any slice), run by the `fold` kernel over several tasks at once (`_fold`); `finalize(state, t, out)` per
    step into `out` (None: the state is the merged vector).
    `layout(T, compact)`: the dtypes of a list state that starts at zero (None: one fp32 tensor that starts
    as a copy of tau-hat_1); compact: smallest memory, for whole-vector states.
    `majority` (TIES: a slice's share of the majority and its count of undecided entries) is summed over every
    slice; when the majority is not positive, the entries `undecided` names take their negative candidate
    (`negatives` sets them in place)."""

    name: str
    update: Callable[..., None]
    finalize: Optional[Callable[[State, int, torch.Tensor], None]] = None
    majority: Optional[Callable[[State], torch.Tensor]] = None
    layout: Optional[Callable[[int, bool], list[torch.dtype]]] = None
    scalars: Callable[[Step], tuple] = no_scalars
    negatives: Optional[Callable[[State, torch.Tensor], None]] = None
    fold: Kernel = field(init=False, repr=False, compare=False)
    elect: Optional[Kernel] = field(init=False, repr=False, compare=False)
    settle: Optional[Kernel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fold", Kernel(partial(_fold, self.update, self.finalize, self.layout is not None)))
        object.__setattr__(self, "elect", Kernel(self.majority) if self.majority else None)
        object.__setattr__(self, "settle", Kernel(self.negatives) if self.negatives else None)


MAGMAX = Combiner("magmax", magmax_update)
SUM = Combiner("sum", sum_update)
MEAN = Combiner("mean", sum_update, mean_finalize)
RANDOM_MIX = Combiner("random_mix", random_mix_update, scalars=random_mix_scalars)
LAST = Combiner("last", last_update)
PAIRWISE_MEAN = Combiner("pairwise_mean", pairwise_mean_update)
DISJOINT_MEAN = Combiner("disjoint_mean", disjoint_update, disjoint_finalize, disjoint_majority,
                         layout=disjoint_layout, negatives=disjoint_negatives)
