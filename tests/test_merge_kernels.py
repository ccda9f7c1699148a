"""Fused (torch.compile) and eager merge kernels give the same bits, a compiler failure falls back to eager,
and random mix draws exactly what its documented hash says."""

from __future__ import annotations

import logging

import pytest
import torch

from clmerge.data.registry import derived_seed
from clmerge.merging import engine, kernels, select
from clmerge.merging.engine import merge_steps
from clmerge.merging.methods import METHODS, MergeParams, get_method
from clmerge.merging.parts import magmax_update
from clmerge.merging.sources import open_sources

Vector = dict[str, torch.Tensor]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def vectors(num_tasks: int) -> list[Vector]:
    """Small-integer multiples of 1/4 (exact sums, frequent ties, zeros of both signs) and a bf16 tensor."""
    g = torch.Generator().manual_seed(7)
    return [{"a.weight": torch.randint(-6, 7, (33, 70), generator=g).float() / 4,
             "b.bias": torch.randint(-2, 3, (5,), generator=g).float() * -0.0,
             "c.weight": (torch.randint(-8, 9, (3, 4, 9), generator=g).float() / 8).bfloat16()}
            for _ in range(num_tasks)]


def run(method: str, taus: list[Vector], every_step: bool, params: MergeParams) -> list[Vector]:
    folded = merge_steps(open_sources(taus), get_method(method), params, every_step)
    return [{k: v.clone() for k, v in m.items()} for _, m in folded]


def test_compiled_kernels_equal_the_eager_ops_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    taus = vectors(4)
    params = MergeParams(seed=3, ties_k=0.3, ties_denominator=5000)
    for method in ("magmax", "average", "task_arithmetic", "random_mix", "ties", "last", "dare_ties"):
        for every_step in (True, False):
            monkeypatch.setenv("CLMERGE_COMPILE", "never")
            eager = run(method, taus, every_step, params)
            monkeypatch.setenv("CLMERGE_COMPILE", "always")
            fused = run(method, taus, every_step, params)
            assert kernels._broken is None
            for a, b in zip(eager, fused, strict=True):
                assert all(torch.equal(a[k], b[k]) and a[k].signbit().equal(b[k].signbit()) for k in a), method


def test_a_large_merge_compiles_the_folds_of_its_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLMERGE_COMPILE", "auto")
    seen: list[tuple[int, bool]] = []
    compiles = kernels.Kernel.compiles

    def spy(self: kernels.Kernel, entries: int, any_size: bool = False) -> bool:
        seen.append((entries, compiles(self, entries, any_size)))
        return seen[-1][1]

    monkeypatch.setattr(kernels.Kernel, "compiles", spy)
    taus = vectors(3)  # random mix folds tensor by tensor: every call is far below MIN_ENTRIES
    small = run("random_mix", taus, False, MergeParams(seed=5))
    assert seen and not any(compiled for _, compiled in seen)  # a small merge: eager
    seen.clear()
    monkeypatch.setattr(engine, "SMALL_MERGE", 1)  # the same merge counted as large
    large = run("random_mix", taus, False, MergeParams(seed=5))
    assert seen and all(compiled for entries, compiled in seen if entries < kernels.MIN_ENTRIES)
    assert all(torch.equal(small[0][k], large[0][k]) for k in small[0])
    monkeypatch.setenv("CLMERGE_COMPILE", "never")
    assert not compiles(kernels.Kernel(magmax_update), 10, any_size=True)


def test_a_compiler_failure_falls_back_to_the_same_eager_result(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken(fn: object, **options: object) -> object:
        def call(*args: object) -> None:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "_broken", None)
    monkeypatch.setenv("CLMERGE_COMPILE", "always")
    kernel = kernels.Kernel(magmax_update)
    state, tau = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, 1.0, 4.0])
    with caplog.at_level(logging.WARNING, logger="clmerge.merging.kernels"):
        kernel(state, tau)
    assert state.tolist() == [-1.0, -2.0, 4.0]
    assert "eager" in caplog.text and "InvalidCxxCompiler" in caplog.text
    assert not kernel.compiles(10**9)  # from now on everything runs eagerly


def mix32(x: int) -> int:
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B % (1 << 32)
    return (x >> 16) ^ x


def test_random_mix_follows_its_documented_hash_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """m_t[e] = tau_t[e] where top24(mix32(mix32(e ^ low) ^ high)) < ceil(2**24 / t), else m_{t-1}[e]."""
    monkeypatch.setenv("CLMERGE_COMPILE", "never")
    taus = [{"w": torch.full((3, 300), float(t))} for t in range(1, 6)]
    merged = run("random_mix", taus, True, MergeParams(seed=11))
    expected = [float("nan")] * 900
    for t in range(1, 6):
        key = derived_seed(11, "random_mix", "w", t)
        low, high = key & 0x7FFFFFFF, key >> 31 & 0x7FFFFFFF
        for e in range(900):
            if mix32(mix32(e ^ low) ^ high) >> 8 < -(-(1 << 24) // t):
                expected[e] = float(t)
        assert merged[t - 1]["w"].reshape(-1).tolist() == expected
    assert METHODS["random_mix"].key_params(MergeParams(seed=11)) == {"seed": 11, "draws": "hash32"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # numba's scan, numba's, torch's
@pytest.mark.parametrize("lo, hi", [(0.25, 0.75), (None, 0.5), (0.0, None), (None, None)])
def test_the_threshold_scan_counts_and_keeps_what_comparisons_select(monkeypatch: pytest.MonkeyPatch,
                                                                     lo, hi, dtype: torch.dtype) -> None:
    values = (torch.randint(-8, 9, (70_000,), generator=torch.Generator().manual_seed(1)).float() / 8).to(dtype)
    values[:100] = -0.0  # zeros of both signs sit on a bracket edge at lo = 0
    values[100:110] = torch.nan  # neither below nor kept
    magnitudes = values.abs()
    inside = (magnitudes >= (-torch.inf if lo is None else lo)) & (magnitudes <= (torch.inf if hi is None else hi))
    below = int((magnitudes < (-torch.inf if lo is None else lo)).sum())
    for mode in ("never", "always"):  # torch's eager and fused kernels; numba's scan takes fp32 and fp64 in both
        monkeypatch.setenv("CLMERGE_COMPILE", mode)
        monkeypatch.setattr(select, "SCAN_CHUNK", 4096)  # the compiled scan's chunks, and one short one
        scanned = select.Bracket(lo, hi)
        scanned.scan(values)
        kept = torch.cat(scanned.candidates)
        assert scanned.below == below
        assert kept.dtype == dtype and torch.equal(kept, magnitudes[inside]) and not kept.signbit().any()
    assert kernels._broken is None
