"""Frozen zero-shot classification heads built from the text tower (SPEC.md 3.2)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def zero_shot_head(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], classnames: Sequence[str],
                   templates: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """W[c] = exp(logit_scale) * normalize(mean_j normalize(encode_text(template_j(classname_c)))).

    Returns a [C, D] fp32 tensor; logits(x) = W @ normalize(encode_image(x)).
    """
    rows = []
    for name in classnames:
        tokens = tokenizer([template.format(c=name) for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return model.logit_scale.exp().float() * torch.stack(rows)


def embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """normalize(encode_image(images)) in fp32: the features every head scores."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


def logits(model: torch.nn.Module, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Class logits of `images` under a zero-shot head."""
    return embed(model, images) @ head.T
