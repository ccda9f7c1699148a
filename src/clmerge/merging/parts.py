"""The parts merge methods are built from (as in mergekit): sparsifiers and combiners.

A sparsifier maps one task vector tensor tau_t to tau-hat_t (trim, random drop); a combiner is a left fold
over tau-hat_1..tau-hat_t in task order with a small state, and `finalize` gives the merged m_t. Each
runs tensor by tensor. Updates may reuse the storage of `state` (like torch's in-place ops) and return
it; a state never aliases its input. The deployed model is theta_0 + lambda * m (SPEC.md sections 1-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from clmerge.data.registry import derived_seed
from clmerge.merging.select import kth_smallest

State = Any  # a tensor, or a list of tensors (TIES)


@dataclass(frozen=True)
class Step:
    """Where a fold is: tensor `name`, task t (1-based) of `num_tasks`, run seed, trim threshold."""

    name: str
    t: int
    num_tasks: int
    seed: int = 0
    threshold: Optional[float] = None


def generator(seed: int, purpose: str, name: str, t: int) -> torch.Generator:
    """One CPU generator per (run seed, purpose, tensor name, task): draws do not depend on run order."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, name, t))


# ------------------------------------------------------------------------------------------ sparsifiers


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
        return kth_smallest(tau.abs(), rank) if rank >= 1 else None

    def __call__(self, tau: torch.Tensor, step: Step) -> torch.Tensor:
        """Trim with the threshold of the scope, which the engine puts in `step.threshold`."""
        if step.threshold is None:
            return tau
        return torch.where(tau.abs() >= step.threshold, tau, 0.0)


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


def magmax_update(state: Optional[torch.Tensor], tau: torch.Tensor, step: Step) -> torch.Tensor:
    """MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322): per entry, the signed value of largest |tau|.

    m_1 = tau_1;  m_t = where(|tau_t| >= |m_{t-1}|, tau_t, m_{t-1})  (">=": ties go to the latest task).
    """
    if state is None:
        return tau.clone()
    return torch.where(tau.abs() >= state.abs(), tau, state, out=state)


def sum_update(state: Optional[torch.Tensor], tau: torch.Tensor, step: Step) -> torch.Tensor:
    """Running sum S_t = S_{t-1} + tau_t."""
    return tau.clone() if state is None else state.add_(tau)


def random_mix_update(state: Optional[torch.Tensor], tau: torch.Tensor, step: Step) -> torch.Tensor:
    """Random mix: m[e] = tau_{r_e}[e], r_e ~ Uniform{1..t}, by reservoir sampling (SPEC.md 2.1).

    m_1 = tau_1;  m_t = where(u < 1/t, tau_t, m_{t-1}),  u ~ U[0, 1) per entry, one generator per
    (run seed, tensor, t).
    """
    if state is None:
        return tau.clone()
    u = torch.rand(tau.shape, generator=generator(step.seed, "random_mix", step.name, step.t))
    return torch.where(u < 1.0 / step.t, tau, state, out=state)


def pairwise_mean_update(state: Optional[torch.Tensor], tau: torch.Tensor, step: Step) -> torch.Tensor:
    """PAM's merge (Sokar et al., arXiv 2506.03189): m_1 = tau_1;  m_t = (m_{t-1} + tau_t) / 2."""
    return tau.clone() if state is None else state.add_(tau).mul_(0.5)


def last_update(state: Optional[torch.Tensor], tau: torch.Tensor, step: Step) -> torch.Tensor:
    """Sequential fine-tuning baseline: m_t = tau_t, i.e. deploy theta_t itself (lambda 1)."""
    return tau.clone() if state is None else state.copy_(tau)


def disjoint_init(tau: torch.Tensor, step: Step) -> list[torch.Tensor]:
    """TIES state before the first task: S+ = S- = 0 (fp32), C+ = C- = 0 (uint8 while T <= 255)."""
    count = torch.uint8 if step.num_tasks <= 255 else torch.int32
    return [torch.zeros(tau.shape), torch.zeros(tau.shape), torch.zeros(tau.shape, dtype=count),
            torch.zeros(tau.shape, dtype=count)]


def disjoint_update(state: Optional[list[torch.Tensor]], tau: torch.Tensor, step: Step) -> list[torch.Tensor]:
    """TIES streaming state: S+ += max(tau,0), S- += min(tau,0), C+ += [tau > 0], C- += [tau < 0]."""
    if state is None:
        state = disjoint_init(tau, step)
    positive, negative, n_positive, n_negative = state
    positive.add_(tau.clamp_min(0.0))
    negative.add_(tau.clamp_max(0.0))
    n_positive.add_(tau > 0)
    n_negative.add_(tau < 0)
    return state


def disjoint_majority(state: list[torch.Tensor]) -> float:
    """This tensor's share of the global majority sign: sum_e sign(S+ + S-)."""
    return float(torch.sign(state[0] + state[1]).sum())


def identity_finalize(state: torch.Tensor, t: int, majority: float, out: torch.Tensor) -> torch.Tensor:
    """The state is the merged vector (`out` is not needed)."""
    return state


def mean_finalize(state: torch.Tensor, t: int, majority: float, out: torch.Tensor) -> torch.Tensor:
    """Weight averaging: m = (1/t) * S_t, the mean of the fine-tuned weights (the reference's order)."""
    return torch.mul(state, 1.0 / t, out=out)


def disjoint_finalize(state: list[torch.Tensor], t: int, majority: float, out: torch.Tensor) -> torch.Tensor:
    """TIES elect + disjoint mean: s = sign(S+ + S-), 0 -> sign of the global majority (sum of s over the
    whole vector); m = S+ / max(C+, 1) where s > 0, else S- / max(C-, 1) (s = 0 selects negatives)."""
    positive, negative, n_positive, n_negative = state
    sign = torch.sign(positive + negative)
    if majority != 0:
        sign = torch.where(sign == 0, math.copysign(1.0, majority), sign)
    return torch.where(sign > 0, positive / n_positive.clamp_min(1), negative / n_negative.clamp_min(1), out=out)


@dataclass(frozen=True)
class Combiner:
    """A fold: update per task, finalize per step into `out` (a buffer reused across steps) or the state
    itself; `majority` (TIES) is summed over every tensor first.
    `elementwise`: update and finalize may run on any slice of a tensor and its state (in place), so the
    engine can feed them cache-sized chunks (after `init`, if given, made the state); random draws are per
    whole tensor, so random mix is not."""

    name: str
    update: Callable[[Optional[State], torch.Tensor, Step], State]
    finalize: Callable[[State, int, float, torch.Tensor], torch.Tensor]
    majority: Optional[Callable[[State], float]] = None
    elementwise: bool = True
    needs_out: bool = False
    init: Optional[Callable[[torch.Tensor, Step], State]] = None


MAGMAX = Combiner("magmax", magmax_update, identity_finalize)
SUM = Combiner("sum", sum_update, identity_finalize)
MEAN = Combiner("mean", sum_update, mean_finalize, needs_out=True)
RANDOM_MIX = Combiner("random_mix", random_mix_update, identity_finalize, elementwise=False)
LAST = Combiner("last", last_update, identity_finalize)
PAIRWISE_MEAN = Combiner("pairwise_mean", pairwise_mean_update, identity_finalize)
DISJOINT_MEAN = Combiner("disjoint_mean", disjoint_update, disjoint_finalize, disjoint_majority, needs_out=True,
                         init=disjoint_init)
