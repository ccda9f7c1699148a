"""Zero-shot heads cached on disk, keyed by the text-side weights, the class names and the templates.

A head depends only on the text tower and logit_scale (fine-tuning trains the visual tower alone), the
prompts and the device kind it was computed on (GPU and CPU kernels round differently). Each head is one
safetensors file `<root>/<sha256 of all that>.safetensors`, written atomically, so concurrent jobs of a
sweep can share the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from clmerge.benchmarks import Benchmark
from clmerge.benchmarks.head import benchmark_head
from clmerge.models.tower import TRAINED_PREFIX
from clmerge.store import atomic_save_tensors


def head_key(model: torch.nn.Module, benchmark: Benchmark, device: torch.device) -> str:
    """sha256 over the non-visual weights (names, dtypes, shapes, bytes), every head part's class names and
    templates, and the device kind."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(TRAINED_PREFIX):
            continue
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    prompts = [[list(part.classnames), list(part.templates)] for part in benchmark.head_parts()]
    digest.update(json.dumps({"prompts": prompts, "device": device.type}).encode())
    return digest.hexdigest()


def cached_head(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], benchmark: Benchmark,
                device: torch.device, root: Path) -> torch.Tensor:
    """The benchmark's all-class head, read from `root` when computed before, else computed and stored."""
    path = root / f"{head_key(model, benchmark, device)}.safetensors"
    if path.exists():
        return load_file(str(path))["head"]
    head = benchmark_head(model, tokenizer, benchmark, device)
    root.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path, {"head": head})
    return head
