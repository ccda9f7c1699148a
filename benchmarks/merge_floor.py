"""The floor of issue 3's "all steps at most 2x the final merge" for averaging at T = 5: ideal loops, no engine.

Two single-pass numba loops over in-memory fp32 vectors (N entries, ViT-B/16's visual tower by default;
every array touched before timing, so no page faults), one thread:
- final only: m_5 = ((((tau_1 + tau_2) + tau_3) + tau_4) + tau_5) / 5 in one pass (reads 5 V, writes 1 V);
- all steps: for t = 1..5, S += tau_t and m_t = S / t in one pass each (reads 2 V, writes 2 V per step).
Any engine's all-steps averaging moves at least the second loop's bytes, and no final-only merge moves fewer
than the first's, so "all steps / final" printed here is the lowest ratio an engine could reach on this machine.

    .venv/bin/python benchmarks/merge_floor.py --repeat 3
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

TASKS = 5


@numba.njit(nogil=True)
def _step(tau: np.ndarray, total: np.ndarray, out: np.ndarray, scale: np.float32, first: bool) -> None:
    for i in range(tau.size):
        value = tau[i] if first else total[i] + tau[i]
        total[i] = value
        out[i] = value * scale


@numba.njit(nogil=True)
def _final(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray, out: np.ndarray,
           scale: np.float32) -> None:
    for i in range(out.size):
        out[i] = ((((a[i] + b[i]) + c[i]) + d[i]) + e[i]) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=86_192_640, help="entries per task vector")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    taus = [rng.random(args.entries, dtype=np.float32) for _ in range(TASKS)]
    total, out = np.ones(args.entries, np.float32), np.ones(args.entries, np.float32)
    _step(taus[0][:8], total[:8], out[:8], np.float32(1), True)  # compile
    _final(*(tau[:8] for tau in taus), out[:8], np.float32(1))
    finals, steps = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        _final(*taus, out, np.float32(1 / TASKS))
        finals.append(time.perf_counter() - start)
        start = time.perf_counter()
        for t in range(TASKS):
            _step(taus[t], total, out, np.float32(1 / (t + 1)), t == 0)
        steps.append(time.perf_counter() - start)
    final, every = min(finals), min(steps)
    print(f"T = {TASKS}, {args.entries:,} entries, 1 thread: final only {final:.3f} s, all steps {every:.3f} s, "
          f"all steps / final {every / final:.2f} (best of {args.repeat})")


if __name__ == "__main__":
    main()
