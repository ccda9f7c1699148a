"""The all-class zero-shot head of a benchmark: one block per dataset, each with its own templates."""

from __future__ import annotations

from typing import Callable

import torch

from clmerge.benchmarks.types import Benchmark
from clmerge.models.heads import zero_shot_head


def benchmark_head(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], benchmark: Benchmark,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """[C, D] head over the benchmark's whole label space (SPEC.md 3.2), blocks in label order."""
    if len(benchmark.classnames) != benchmark.num_classes:
        raise ValueError("the benchmark was built without its data root: its class names are unknown")
    return torch.cat([zero_shot_head(model, tokenizer, part.classnames, part.templates, device)
                      for part in benchmark.head_parts()])
