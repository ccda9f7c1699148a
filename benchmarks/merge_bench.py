"""Merge-engine benchmark: ViT-B/16 visual-tower task vectors, T = 5, 10, 20, warm page cache.

Before the table, each method runs once on 2 tasks (its first call compiles the fused kernels, from
torch's on-disk cache after the first run ever), and once untimed at each T (the final-only kernel folds
all T tasks per call and is compiled per task count). For each T it prints, in one process and side by side:
the time to read the T task-vector files once (the baseline: one thread, `preadv` of every tensor into a
reused buffer), each method's final-only and all-steps merge time with ratios to the read, the peak
resident memory above the process's baseline (sampled every 2 ms; in all, and anonymous only: the engine's
mapped task-vector pages are page cache), and a reference-style in-memory implementation (load every task
vector, stack, reduce; re-merge from scratch for every step).

Each method runs in --repeat rounds of (read, final only, all steps). Times are the best of the rounds;
each ratio is the median over the rounds of the ratio within a round, so that the host's speed, which
drifts over minutes, cancels out of it.

    .venv/bin/python benchmarks/merge_bench.py --tasks 5,10,20 --threads 1 --repeat 3

Writes max(T) x 345 MB of safetensors under --dir (a temporary folder by default) and deletes them.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import open_clip
import torch
from safetensors.torch import load_file, save_file

from clmerge.merging import kernels
from clmerge.merging.engine import merge_steps
from clmerge.merging.memory import release_freed_heap
from clmerge.merging.methods import MergeParams, get_method
from clmerge.merging.reader import TensorFile

PAGE = resource.getpagesize()
MB = 1e6


def rss() -> tuple[int, int]:
    """(resident bytes, of which anonymous: resident minus the file-backed and shared pages)."""
    with open("/proc/self/statm") as handle:
        fields = handle.read().split()
    return int(fields[1]) * PAGE, (int(fields[1]) - int(fields[2])) * PAGE


class PeakRSS:
    """Peak resident memory while the block runs, in all and anonymous only (the mapped task-vector pages
    are page cache, shared and reclaimable), above the resident memory when it starts."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._update()

    def _update(self) -> None:
        now = rss()
        self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()

    @property
    def above(self) -> tuple[float, float]:
        return (self.peak[0] - self.start[0]) / MB, (self.peak[1] - self.start[1]) / MB


def visual_shapes() -> tuple[dict[str, torch.Size], int]:
    """ViT-B/16 visual-tower shapes, and the floating entries of the whole model (built on meta)."""
    with torch.device("meta"):
        model = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    state = model.state_dict()
    shapes = {k: v.shape for k, v in state.items() if k.startswith("visual.") and v.dtype.is_floating_point}
    return shapes, sum(v.numel() for v in state.values() if v.dtype.is_floating_point)


def write_task_vectors(folder: Path, shapes: dict[str, torch.Size], count: int) -> list[Path]:
    paths = []
    for t in range(count):
        g = torch.Generator().manual_seed(t)
        paths.append(folder / f"task_{t:03d}.safetensors")
        save_file({k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}, str(paths[-1]))
    return paths


def read_once(paths: list[Path]) -> None:
    """The baseline: every tensor of every file read into one reused buffer, nothing else."""
    files = [TensorFile(p) for p in paths]
    buffer = torch.empty(max(e.numel for e in files[0].entries.values()))
    for f in files:
        for name in f.entries:
            f.read_into(name, buffer)
        f.close()


def engine(paths: list[Path], method: str, params: MergeParams, every_step: bool) -> None:
    files = [TensorFile(p) for p in paths]
    for _ in merge_steps(files, get_method(method), params, every_step):
        pass
    for f in files:
        f.close()


def reference_style(paths: list[Path], method: str, every_step: bool) -> None:
    """As the reference does it: all task vectors in memory, stack and reduce, every step from scratch."""
    vectors = [{k: v.clone() for k, v in load_file(str(p)).items()} for p in paths]
    for t in (range(1, len(paths) + 1) if every_step else [len(paths)]):
        merged = {}
        for name in vectors[0]:
            stacked = torch.stack([v[name] for v in vectors[:t]])
            if method == "magmax":
                index = t - 1 - stacked.abs().flip(0).argmax(0)
                merged[name] = stacked.gather(0, index.unsqueeze(0)).squeeze(0)
            else:
                merged[name] = stacked.sum(0) / t
        del merged


def timed(action: Callable[[], None], repeat: int) -> tuple[float, float, float]:
    """Best wall time of `repeat` runs, and the largest peak memory above the start (MB), in all and
    anonymous only."""
    runs = rounds({"action": action}, repeat)["action"]
    return min(runs.seconds), runs.peak, runs.anon


@dataclass
class Runs:
    """The wall times of one action's runs, one per round, and its largest peak memory above the start (MB),
    in all and anonymous only."""

    seconds: list[float] = field(default_factory=list)
    peak: float = 0.0
    anon: float = 0.0


def rounds(actions: dict[str, Callable[[], None]], repeat: int) -> dict[str, Runs]:
    """`repeat` rounds, each running every action once in order: a ratio then pairs two runs made seconds
    apart, so that the host's speed, which drifts over minutes, cancels out."""
    runs = {name: Runs() for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            release_freed_heap()  # glibc keeps freed heap memory: RSS growth then measures real use
            with PeakRSS() as memory:
                start = time.perf_counter()
                action()
                runs[name].seconds.append(time.perf_counter() - start)
            runs[name].peak = max(runs[name].peak, memory.above[0])
            runs[name].anon = max(runs[name].anon, memory.above[1])
    return runs


def ratio(numerator: Runs, denominator: Runs) -> float:
    """The median over rounds of numerator / denominator within a round."""
    return statistics.median(a / b for a, b in zip(numerator.seconds, denominator.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="5,10,20", help="task counts, comma-separated")
    parser.add_argument("--methods", default="magmax,average,task_arithmetic,random_mix,ties")
    parser.add_argument("--reference", default="magmax,average", help="methods also run reference-style")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the task vectors")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.tasks.split(",")]
    shapes, full_model = visual_shapes()
    vector_mb = sum(s.numel() for s in shapes.values()) * 4 / MB
    folder = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.dir))
    try:
        paths = write_task_vectors(folder, shapes, max(counts))
        params = MergeParams(ties_denominator=full_model)
        print(f"ViT-B/16 visual tower: {len(shapes)} tensors, 1 task vector = {vector_mb:.1f} MB; "
              f"torch threads {torch.get_num_threads()}; "
              f"memory target 3 V + 300 MB = {3 * vector_mb + 300:.0f} MB")
        for method in args.methods.split(","):  # first calls compile the fused kernels (merging.kernels)
            start = time.perf_counter()
            engine(paths[:2], method, params, False)
            engine(paths[:2], method, params, True)
            print(f"first call of {method} (compiles its kernels, mode {kernels.mode()}): "
                  f"{time.perf_counter() - start:.1f} s")
        header = f"{'T':>3} {'what':<22} {'final s':>8} {'x read':>7} {'steps s':>8} {'steps/final':>11} " \
                 f"{'peak MB':>8} {'x V':>5} {'anon MB':>8}"
        print(header)
        for count in counts:
            subset = paths[:count]
            read_once(subset)  # warm the page cache
            read_s, read_mb, read_anon = timed(lambda: read_once(subset), args.repeat)
            print(f"{count:>3} {'read files once':<22} {read_s:>8.3f} {1:>7.2f} {'':>8} {'':>11} {read_mb:>8.0f} "
                  f"{read_mb / vector_mb:>5.2f} {read_anon:>8.0f}")
            for method in args.methods.split(","):
                for every_step in (False, True):  # untimed: compiles the kernel for this T's row count
                    engine(subset, method, params, every_step)
                runs = rounds({"read": lambda: read_once(subset),
                               "final": lambda: engine(subset, method, params, False),
                               "steps": lambda: engine(subset, method, params, True)}, args.repeat)
                final, steps = runs["final"], runs["steps"]
                peak = max(final.peak, steps.peak)
                print(f"{count:>3} {method:<22} {min(final.seconds):>8.3f} {ratio(final, runs['read']):>7.2f} "
                      f"{min(steps.seconds):>8.3f} {ratio(steps, final):>11.2f} {peak:>8.0f} "
                      f"{peak / vector_mb:>5.2f} {max(final.anon, steps.anon):>8.0f}")
                if method in args.reference.split(","):
                    read_s = statistics.median(runs["read"].seconds)
                    ref_final, ref_final_mb, ref_final_anon = timed(lambda: reference_style(subset, method, False), 1)
                    ref_steps, ref_steps_mb, ref_steps_anon = timed(lambda: reference_style(subset, method, True), 1)
                    ref_peak = max(ref_final_mb, ref_steps_mb)
                    print(f"{count:>3} {'  reference-style':<22} {ref_final:>8.3f} {ref_final / read_s:>7.2f} "
                          f"{ref_steps:>8.3f} {ref_steps / ref_final:>11.2f} {ref_peak:>8.0f} "
                          f"{ref_peak / vector_mb:>5.2f} {max(ref_final_anon, ref_steps_anon):>8.0f}   engine is "
                          f"{ref_steps / min(steps.seconds):.1f}x faster (all steps), "
                          f"{ref_peak / max(peak, 1):.1f}x less memory")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
