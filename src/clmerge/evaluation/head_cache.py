"""Zero-shot heads cached on disk, keyed by the text-side weights, the class names and the templates.

A head depends only on the text tower and logit_scale (fine-tuning trains the visual tower alone), the
prompts and the device kind it was computed on (GPU and CPU kernels round differently). Each head is one
safetensors file `<root>/<sha256 of all that>.safetensors`, written atomically, so concurrent jobs of a
sweep can share the cache. The file's metadata holds the sha256 of the head tensor (`head_sha256`), checked
on every read: a damaged or unreadable file is recomputed and rewritten, with a warning. A cache folder that
cannot be written (a read-only store) is skipped with one warning, and each head is computed when needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from clmerge.benchmarks import Benchmark
from clmerge.benchmarks.head import benchmark_head
from clmerge.errors import UserError
from clmerge.models.tower import TRAINED_PREFIX
from clmerge.store import atomic_save_tensors, make_dir

_log = logging.getLogger(__name__)
CHECKSUM = "head_sha256"  # the metadata key of the head tensor's sha256
_unwritable: set[Path] = set()  # cache folders this process could not write: heads are computed, not stored


class DamagedHead(ValueError):
    """A cached head that cannot be read or does not match its checksum; the message says what is wrong."""


class UncheckedHead(DamagedHead):
    """A cached head without a checksum (written by clmerge before heads carried one)."""


def _add_tensor(digest: hashlib._Hash, label: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's label, dtype, shape and bytes to `digest`."""
    value = tensor.detach().cpu().contiguous()
    digest.update(f"{label}:{value.dtype}:{tuple(value.shape)}".encode())
    digest.update(value.reshape(-1).view(torch.uint8).numpy())


def head_key(model: torch.nn.Module, benchmark: Benchmark, device: torch.device) -> str:
    """sha256 over the non-visual weights (names, dtypes, shapes, bytes), every head part's class names and
    templates, and the device kind."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(TRAINED_PREFIX):
            _add_tensor(digest, name, tensor)
    prompts = [[list(part.classnames), list(part.templates)] for part in benchmark.head_parts()]
    digest.update(json.dumps({"prompts": prompts, "device": device.type}).encode())
    return digest.hexdigest()


def head_sha256(head: torch.Tensor) -> str:
    """sha256 over the head tensor's dtype, shape and bytes (what the cache file's metadata records)."""
    digest = hashlib.sha256()
    _add_tensor(digest, "head", head)
    return digest.hexdigest()


def read_head(path: Path) -> torch.Tensor:
    """The head stored at `path`, after checking it against its checksum; DamagedHead when it cannot be used."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
            head = handle.get_tensor("head")
    except (OSError, SafetensorError) as exc:
        raise DamagedHead(f"cannot be read ({exc})") from None
    if metadata is None:
        raise UncheckedHead("has no checksum (written by an older clmerge)")
    if metadata.get(CHECKSUM) != head_sha256(head):
        raise DamagedHead("does not match its checksum (damaged)")
    return head


def cached_head(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], benchmark: Benchmark,
                device: torch.device, root: Path) -> torch.Tensor:
    """The benchmark's all-class head, read from `root` when computed before, else computed and stored."""
    path = root / f"{head_key(model, benchmark, device)}.safetensors"
    if path.exists():
        try:
            return read_head(path)
        except DamagedHead as err:
            _log.warning("the cached zero-shot head %s %s; computing it again", path, err)
    head = benchmark_head(model, tokenizer, benchmark, device)
    _keep(path, head)
    return head


def _keep(path: Path, head: torch.Tensor) -> None:
    """Store `head` at `path` atomically, with its checksum; a folder that cannot be written is skipped (one
    warning per folder and process)."""
    if path.parent in _unwritable:
        return
    try:
        make_dir(path.parent)
        atomic_save_tensors(path, {"head": head}, metadata={CHECKSUM: head_sha256(head)})
    except UserError as err:
        _unwritable.add(path.parent)
        _log.warning("zero-shot heads are not cached, but computed when needed: %s", err)
