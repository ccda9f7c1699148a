"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the visual tower: W = W_0 + (alpha/r) B A.

Our own small module rather than a library: open_clip's attention is `nn.MultiheadAttention`, whose packed
q/k/v projection is the raw parameter `in_proj_weight`, not an `nn.Linear` that adapter libraries wrap.
`torch.nn.utils.parametrize` adapts any weight tensor in place (Linear or MHA alike) without touching
the forward code, and `detach` restores the module exactly, so the rest of clmerge (task vectors, merging,
evaluation) keeps working on plain dense towers.

Adapter factors are keyed `<weight key>.lora_A` ([r, in]) and `<weight key>.lora_B` ([out, r]), the weight
key being the tower's state-dict name (e.g. `visual.transformer.resblocks.0.attn.in_proj_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from clmerge.config import LoraConfig
from clmerge.errors import UserError
from clmerge.models.tower import TRAINED_PREFIX

Tensors = dict[str, torch.Tensor]
# the target name of nn.MultiheadAttention's packed q/k/v projection (its raw in_proj_weight)
_MHA_IN_PROJ = "attn.in_proj"


class LowRankDelta(nn.Module):
    """The parametrization W_0 -> W_0 + scale * B A, with trainable factors A [r, in] and B [out, r]."""

    def __init__(self, out_features: int, in_features: int, r: int, scale: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


@dataclass(frozen=True)
class Site:
    """One adapted weight: its module, attribute and state-dict key."""

    module: nn.Module
    attribute: str
    key: str


def available_targets(model: nn.Module) -> list[str]:
    """The target names this model's visual tower offers (attn.in_proj and Linear-name suffixes)."""
    names = set()
    for name, module in model.visual.named_modules():
        if isinstance(module, nn.MultiheadAttention) and name.endswith("attn"):
            names.add(_MHA_IN_PROJ)
        elif isinstance(module, nn.Linear) and "." in name:
            names.add(".".join(name.split(".")[-2:]))
    return sorted(names)


def find_sites(model: nn.Module, targets: list[str]) -> list[Site]:
    """Every visual-tower weight a target names, in module order; a target matching nothing is an error."""
    sites, matched = [], set()
    for name, module in model.visual.named_modules():
        prefix = f"{TRAINED_PREFIX}{name}"
        for target in targets:
            if target == _MHA_IN_PROJ and isinstance(module, nn.MultiheadAttention) and name.endswith("attn"):
                sites.append(Site(module, "in_proj_weight", f"{prefix}.in_proj_weight"))
                matched.add(target)
            elif target != _MHA_IN_PROJ and isinstance(module, nn.Linear) and name.endswith(f".{target}"):
                sites.append(Site(module, "weight", f"{prefix}.weight"))
                matched.add(target)
    missing = [t for t in targets if t not in matched]
    if missing:
        raise UserError(f"finetune.lora.targets entry '{missing[0]}' matches no module of the visual tower; "
                        f"available: {', '.join(available_targets(model))}")
    return sites


def check_lora(cfg: LoraConfig, model: nn.Module) -> list[Site]:
    """The sites of `cfg`, with the rank checked against every adapted layer."""
    if not cfg.targets:
        raise UserError("finetune.lora.targets is empty; list modules such as "
                        f"{', '.join(available_targets(model))}")
    sites = find_sites(model, cfg.targets)
    smallest = min(min(getattr(s.module, s.attribute).shape) for s in sites)
    if not 1 <= cfg.r <= smallest:
        raise UserError(f"finetune.lora.r={cfg.r} is out of range; use 1..{smallest} (the smallest adapted layer)")
    if cfg.alpha <= 0 or cfg.lr <= 0:
        raise UserError("finetune.lora.alpha and finetune.lora.lr must be positive")
    return sites


def init_factors(sites: list[Site], r: int, seed: int) -> Tensors:
    """The standard LoRA init: A ~ Kaiming-uniform(a=sqrt(5)) (seeded), B = 0."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for site in sites:
        out_features, in_features = getattr(site.module, site.attribute).shape
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an [r, in] matrix
        factors[f"{site.key}.lora_A"] = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound
        factors[f"{site.key}.lora_B"] = torch.zeros(out_features, r)
    return factors


class Adapters:
    """LoRA attached to a model's visual tower for one task: load factors, train them, read them back."""

    def __init__(self, sites: list[Site], cfg: LoraConfig) -> None:
        self.sites, self.scale = sites, cfg.alpha / cfg.r
        self.deltas: dict[str, LowRankDelta] = {}
        for site in sites:
            out_features, in_features = getattr(site.module, site.attribute).shape
            delta = LowRankDelta(out_features, in_features, cfg.r, self.scale)
            delta.to(getattr(site.module, site.attribute).device)
            parametrize.register_parametrization(site.module, site.attribute, delta)
            self.deltas[site.key] = delta

    @property
    def params(self) -> list[nn.Parameter]:
        """The trained factors, A then B per site, in site order."""
        return [p for delta in self.deltas.values() for p in (delta.lora_A, delta.lora_B)]

    @torch.no_grad()
    def load(self, factors: Tensors) -> None:
        for key, delta in self.deltas.items():
            delta.lora_A.copy_(factors[f"{key}.lora_A"])
            delta.lora_B.copy_(factors[f"{key}.lora_B"])

    def factors(self) -> Tensors:
        """A detached fp32 CPU copy of every factor."""
        return {f"{key}.lora_{part}": getattr(delta, f"lora_{part}").detach().to("cpu", torch.float32, copy=True)
                for key, delta in self.deltas.items() for part in ("A", "B")}

    def detach(self) -> None:
        """Remove the adapters, leaving every weight exactly W_0."""
        for site in self.sites:
            parametrize.remove_parametrizations(site.module, site.attribute, leave_parametrized=False)


def dense_delta(factors: Tensors, base: Tensors, scale: float) -> Tensors:
    """The tower vector the factors represent: scale * B A at every adapted weight, zero elsewhere."""
    vector = {}
    for key, value in base.items():
        a, b = factors.get(f"{key}.lora_A"), factors.get(f"{key}.lora_B")
        vector[key] = torch.zeros_like(value) if a is None else scale * (b @ a)
    return vector
