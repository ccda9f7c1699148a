"""PAM's alignment step (SPEC.md 1.2; Sokar et al., arXiv 2506.03189), on plain tensors.

During task t (t >= 2) the entries of the task's vector psi whose sign conflicts with the global vector
phi_{t-1} at phi's top-p % magnitude positions are reset, every K optimizer steps:
    C_k = M_k & (psi_k * phi_k < 0)        (strict: zeros never conflict)
    psi_k[C_k] <- 0  (reset "zero")  |  phi_k[C_k]  (reset "global")
Vectors are relative to theta_0 (full fine-tuning) or LoRA factors; a trained tensor is offset + psi,
with offset theta_0's weight (full) or none (LoRA factors are the vector itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from clmerge.config import PamConfig
from clmerge.errors import UserError
from clmerge.merging.diagnostics import layer_of
from clmerge.merging.select import kth_smallest_magnitude

Tensors = dict[str, torch.Tensor]


def check_pam(cfg: PamConfig) -> None:
    """Reject PAM knobs no run could use."""
    if not 0.0 <= cfg.p <= 1.0:
        raise UserError(f"finetune.pam.p must lie in [0, 1], got {cfg.p}")
    if cfg.every < 1:
        raise UserError(f"finetune.pam.every (K) must be at least 1, got {cfg.every}")
    for name, value, valid in (("scope", cfg.scope, ("tensor", "global")), ("reset", cfg.reset, ("zero", "global")),
                               ("merge", cfg.merge, ("pairwise_mean", "running_mean"))):
        if value not in valid:
            raise UserError(f"finetune.pam.{name}={value} is not valid; use {' or '.join(valid)}")


def _threshold(values: torch.Tensor, p: float) -> Optional[float]:
    """The ceil(p N)-th largest of N |values| (None: the mask is empty)."""
    keep = math.ceil(p * values.numel())
    if keep < 1:
        return None
    return kth_smallest_magnitude(values, values.numel() - keep + 1)


def top_masks(phi: Tensors, p: float, scope: str) -> Tensors:
    """M_k = |phi_k| >= the ceil(p N)-th largest |phi| of the scope (one tensor, or every tensor together);
    ties at the threshold are kept; p = 0 gives empty masks, p = 1 full ones."""
    if scope == "global":
        threshold = _threshold(torch.cat([v.reshape(-1) for v in phi.values()]), p)
        thresholds = {key: threshold for key in phi}
    else:
        thresholds = {key: _threshold(v, p) for key, v in phi.items()}
    return {key: (torch.zeros_like(v, dtype=torch.bool) if thresholds[key] is None else v.abs() >= thresholds[key])
            for key, v in phi.items()}


@dataclass
class AlignmentLog:
    """Misaligned shares measured at each alignment, before its resets: overall and per layer."""

    alignments: int = 0
    conflicts: int = 0
    protected: int = 0
    by_layer: dict[str, list[int]] = field(default_factory=dict)  # layer -> [conflicts, protected]

    def record(self, key: str, conflicts: int, protected: int) -> None:
        self.conflicts += conflicts
        self.protected += protected
        counts = self.by_layer.setdefault(layer_of(key), [0, 0])
        counts[0] += conflicts
        counts[1] += protected

    def to_json(self) -> dict[str, object]:
        """Mean misaligned share |C| / |M| over the task's alignments, overall and per layer."""
        def rate(c: int, m: int) -> Optional[float]:
            return round(c / m, 6) if m else None
        return {"alignments": self.alignments, "misaligned_before": rate(self.conflicts, self.protected),
                "misaligned_before_by_layer": {k: rate(c, m) for k, (c, m) in self.by_layer.items()}}


@torch.no_grad()
def align(params: dict[str, torch.Tensor], offsets: dict[str, Optional[torch.Tensor]], phi: Tensors,
          masks: Tensors, reset: str, log: AlignmentLog,
          moments: Optional[dict[str, list[torch.Tensor]]] = None) -> None:
    """Reset the conflicting entries of every trained tensor in place (psi = param - offset), zeroing the
    optimizer moments there when `moments` (key -> [exp_avg, exp_avg_sq]) is given."""
    log.alignments += 1
    for key, param in params.items():
        offset = offsets[key]
        phi_k = phi[key].to(param.device, param.dtype)
        mask = masks[key].to(param.device)
        psi = param if offset is None else param - offset
        conflict = mask & (psi * phi_k < 0)
        log.record(key, int(conflict.sum()), int(mask.sum()))
        target = phi_k if reset == "global" else torch.zeros_like(phi_k)
        value = target if offset is None else offset + target
        param.copy_(torch.where(conflict, value, param))
        for moment in (moments or {}).get(key, []):
            moment.masked_fill_(conflict, 0.0)


def sign_conflicts(psi: Tensors, phi: Tensors, masks: Tensors) -> dict[str, object]:
    """Sign-conflict rates of psi against phi: over every entry, over the protected entries, and per layer
    (over every entry of the layer)."""
    layers: dict[str, list[int]] = {}
    conflicts = protected_conflicts = protected = total = 0
    for key in psi:
        conflict = psi[key] * phi[key] < 0
        count = int(conflict.sum())
        conflicts, total = conflicts + count, total + conflict.numel()
        protected_conflicts += int((conflict & masks[key]).sum())
        protected += int(masks[key].sum())
        layer = layers.setdefault(layer_of(key), [0, 0])
        layer[0], layer[1] = layer[0] + count, layer[1] + conflict.numel()
    return {"conflict_rate": round(conflicts / max(total, 1), 6),
            "conflict_rate_protected": round(protected_conflicts / protected, 6) if protected else None,
            "conflict_rate_by_layer": {k: round(c / n, 6) for k, (c, n) in layers.items()}}
