"""Fused elementwise kernels: one merge step in one pass over memory, via torch.compile (inductor's C++).

Eager torch runs each elementwise op as its own pass (MagMax's update is four), so the engine wraps each
step function in a `Kernel`: for calls on at least `MIN_ENTRIES` entries the same Python function is
compiled (`dynamic=True`: one compile for every size; one per number of tasks folded in a call) and runs
as one fused loop; smaller calls run eagerly (a compiled call costs tens of microseconds). The compiled
and eager paths run the same ops and give the same bits (tests/test_merge_kernels.py). `CLMERGE_COMPILE`
chooses: `auto` (default), `always` (any size; for tests) or `never`. If compiling fails (no C++
compiler, no inductor), one warning is logged and everything runs eagerly from then on.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)
MIN_ENTRIES = 1 << 17  # smaller calls run eagerly (the small tensors of the tests, the world model)
EAGER_CHUNK = 1 << 16  # entries per eager call: the temporaries of unfused ops stay in the L2 cache
FUSED_CHUNK = 1 << 20  # entries per fused call of the slice-by-slice kernels (torch's threshold scan, majority)
RECOMPILE_LIMIT = 256  # compiled variants of all kernels together
MODES = ("auto", "always", "never")
_broken: Optional[str] = None  # why compiling failed, once it has


def mode() -> str:
    """The compile mode from `CLMERGE_COMPILE` (auto | always | never)."""
    value = os.environ.get("CLMERGE_COMPILE", "auto").strip().lower() or "auto"
    return value if value in MODES else "auto"


def _size(argument: Any) -> int:
    return argument.numel() if isinstance(argument, torch.Tensor) else _size(argument[0])


class Kernel:
    """`fn(state, ...)`, elementwise and in place on its first tensors, fused by torch.compile when it pays."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._compiled: Optional[Callable[..., Any]] = None

    def compiles(self, entries: int, any_size: bool = False) -> bool:
        """Whether a call on `entries` entries runs the compiled kernel (in `auto` mode, at any size with
        `any_size`: a large merge's small tensors, where eager ops would cost more than a compiled call)."""
        chosen = mode()
        return _broken is None and chosen != "never" and (chosen == "always" or any_size or entries >= MIN_ENTRIES)

    def chunk(self, entries: int) -> int:
        """Entries per call when a tensor of `entries` entries is processed slice by slice."""
        return FUSED_CHUNK if self.compiles(entries) else EAGER_CHUNK

    def __call__(self, *args: Any, any_size: bool = False) -> Any:
        global _broken
        if not self.compiles(_size(args[0]), any_size):
            return self.fn(*args)
        if self._compiled is None:
            # Kernels are partials, so dynamo files every variant (per combiner, row count, first call or not)
            # under one code object whose default limit of 8 would send the rest to slow eager frames.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            with warnings.catch_warnings():  # importing inductor trips torch's own jit deprecation warning
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, same results
            _broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("torch.compile is unavailable (%s); merging with eager torch ops (slower)", _broken)
            return self.fn(*args)
