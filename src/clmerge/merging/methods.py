"""The merge-method registry: each method is a combiner, optionally after a sparsifier (SPEC.md 1.1, 2).

Composite methods are built from parts, as in mergekit: `ties` = TopK trim x sign-elected disjoint mean,
`dare_<m>` = DARE random drop x the combiner of method m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from clmerge.errors import UserError
from clmerge.merging.parts import (DISJOINT_MEAN, LAST, MAGMAX, MEAN, PAIRWISE_MEAN, RANDOM_MIX, SUM, Combiner,
                                   Dare, Sparsifier, TopK)


RANDOM_MIX_DRAWS = "hash32"  # random mix's draws (parts.uniform24); earlier stores drew with torch.rand


@dataclass(frozen=True)
class MergeParams:
    """The knobs of the parts (merge.ties.*, merge.dare.*) and the run seed of the random ones."""

    seed: int = 0
    ties_k: float = 0.2
    ties_scope: str = "global"  # global | tensor
    ties_denominator: Optional[int] = None  # N_ref of the global scope; None = the stored entries
    dare_p: float = 0.5


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its combiner, its sparsifier ("topk", "dare" or None) and default lambda."""

    name: str
    combiner: Combiner
    sparsify: Optional[str]
    default_alpha: float
    reference: str

    def sparsifier(self, params: MergeParams) -> Optional[Sparsifier]:
        """The configured sparsifier instance, if the method has one."""
        if self.sparsify == "topk":
            return TopK(params.ties_k, params.ties_scope, params.ties_denominator)
        if self.sparsify == "dare":
            return Dare(params.dare_p)
        return None

    @property
    def random(self) -> bool:
        """Whether the merged vector depends on the run seed."""
        return self.sparsify == "dare" or self.combiner is RANDOM_MIX

    def key_params(self, params: MergeParams) -> dict[str, Any]:
        """The params the merged vector depends on (they go into the store key)."""
        found: dict[str, Any] = {"seed": params.seed} if self.random else {}
        if self.combiner is RANDOM_MIX:
            found["draws"] = RANDOM_MIX_DRAWS
        if self.sparsify == "topk":
            found.update(k=params.ties_k, scope=params.ties_scope, denominator=params.ties_denominator)
        if self.sparsify == "dare":
            found.update(p=params.dare_p)
        return found


_BASE = (
    MergeMethod("magmax", MAGMAX, None, 0.5, "Marczak et al., MagMax, ECCV 2024, arXiv 2407.06322"),
    MergeMethod("average", MEAN, None, 1.0, "weight averaging, Wortsman et al., model soups, ICML 2022"),
    MergeMethod("task_arithmetic", SUM, None, 0.3, "Ilharco et al., task arithmetic, ICLR 2023, arXiv 2212.04089"),
    MergeMethod("random_mix", RANDOM_MIX, None, 1.0, "random mixing baseline of MagMax, arXiv 2407.06322"),
    MergeMethod("ties", DISJOINT_MEAN, "topk", 0.55, "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv 2306.01708"),
    MergeMethod("last", LAST, None, 1.0, "sequential fine-tuning: the last fine-tuned model itself"),
    MergeMethod("pam", PAIRWISE_MEAN, None, 1.0, "Sokar et al., PAM, arXiv 2506.03189: global <- (global + task) / 2"),
)
_DARE = "Yu et al., DARE, ICML 2024, arXiv 2311.03099"
METHODS: dict[str, MergeMethod] = {method.name: method for method in (
    *_BASE,
    MergeMethod("dare", SUM, "dare", 0.3, f"{_DARE}, with task arithmetic"),
    *(MergeMethod(f"dare_{m.name}", m.combiner, "dare", m.default_alpha, f"{_DARE}, with {m.name}")
      for m in _BASE if m.name in ("magmax", "average", "ties")),
)}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`, or a one-line error listing the valid names."""
    if name not in METHODS:
        raise UserError(f"unknown merge method '{name}'; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def resolve_alpha(method: MergeMethod, alpha: Optional[float]) -> float:
    """The lambda to deploy with: the configured one, or the method's default."""
    return method.default_alpha if alpha is None else float(alpha)
