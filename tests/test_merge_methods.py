"""Every merge method against a straightforward batch implementation of its definition (SPEC.md 1.1, 2).

Property-based over shapes, stored dtypes, task counts and values drawn from a few small dyadic numbers,
so that ties are frequent and every fp32 sum is exact: the fold must then equal the batch oracle bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clmerge.errors import UserError
from clmerge.merging.engine import merge_final, merge_steps
from clmerge.merging.methods import METHODS, MergeParams, get_method
from clmerge.merging.parts import Dare, Step
from clmerge.merging.sources import open_sources

Vector = dict[str, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def steps(method: str, taus: list[Vector], params: MergeParams = MergeParams()) -> list[Vector]:
    folded = merge_steps(open_sources(taus), get_method(method), params)
    return [{k: v.clone() for k, v in m.items()} for _, m in folded]


def stack(taus: list[Vector], name: str) -> torch.Tensor:
    return torch.stack([tau[name].float() for tau in taus])


def magmax_oracle(x: torch.Tensor) -> torch.Tensor:
    """Stack, |.|, the LAST index of the maximum."""
    index = x.shape[0] - 1 - x.abs().flip(0).argmax(0)
    return x.gather(0, index.unsqueeze(0)).squeeze(0)


def ties_oracle(taus: list[Vector], k: float, denominator: int | None) -> Vector:
    """TIES as the reference computes it: flatten each whole vector, kthvalue trim, elect, disjoint mean."""
    names = list(taus[0])
    flat = torch.stack([torch.cat([tau[n].float().reshape(-1) for n in names]) for tau in taus])
    n = flat.shape[1]
    keep = math.floor(k * (denominator or n))
    if n - keep >= 1:
        thr = flat.abs().kthvalue(n - keep, dim=1, keepdim=True).values
        flat = flat * (flat.abs() >= thr)
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    chosen = torch.where(sign > 0, flat > 0, flat < 0)
    merged = (flat * chosen).sum(0) / chosen.sum(0).clamp_min(1)
    out, start = {}, 0
    for name in names:
        size = taus[0][name].numel()
        out[name] = merged[start:start + size].reshape(taus[0][name].shape)
        start += size
    return out


VALUES = st.sampled_from([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 1.5, -1.5])


@st.composite
def task_vectors(draw: st.DrawFn) -> list[Vector]:
    """1-7 task vectors of 1-3 tensors with shapes of 1-3 dims and a stored dtype each."""
    num_tasks = draw(st.integers(1, 7))
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=3))
    dtypes = draw(st.lists(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
                           min_size=len(shapes), max_size=len(shapes)))
    taus = []
    for _ in range(num_tasks):
        tau = {}
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            numel = math.prod(shape)
            values = draw(st.lists(VALUES, min_size=numel, max_size=numel))
            tau[f"layer{i}.weight"] = torch.tensor(values).reshape(shape).to(dtype)
        taus.append(tau)
    return taus


@settings(max_examples=25, deadline=None)
@given(task_vectors())
def test_folds_equal_their_batch_definitions_at_every_step(taus: list[Vector]) -> None:
    results = {name: steps(name, taus) for name in ("magmax", "average", "task_arithmetic", "last")}
    for t in range(1, len(taus) + 1):
        for name in taus[0]:
            x = stack(taus[:t], name)
            assert torch.equal(results["magmax"][t - 1][name], magmax_oracle(x))
            assert torch.equal(results["task_arithmetic"][t - 1][name], x.sum(0))
            assert torch.equal(results["average"][t - 1][name], x.sum(0) * (1.0 / t))
            assert torch.equal(results["last"][t - 1][name], x[-1])
            assert all(m.dtype == torch.float32 for m in results["magmax"][t - 1].values())


@settings(max_examples=25, deadline=None)
@given(task_vectors(), st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.sampled_from([None, 3, 200]))
def test_ties_equals_the_reference_definition(taus: list[Vector], k: float, denominator: int | None) -> None:
    params = MergeParams(ties_k=k, ties_denominator=denominator)
    for t, merged in enumerate(steps("ties", taus, params), start=1):
        expected = ties_oracle(taus[:t], k, denominator)
        assert all(torch.equal(merged[name], expected[name]) for name in expected)
    final = merge_final(open_sources(taus), get_method("ties"), params)  # the chunk-major path
    assert all(torch.equal(final[name], expected[name]) for name in expected)


@settings(max_examples=20, deadline=None)
@given(task_vectors(), st.sampled_from([0.0, 0.3, 1.0]))
def test_ties_per_tensor_scope_trims_each_tensor_on_its_own(taus: list[Vector], k: float) -> None:
    trimmed = []
    for tau in taus:  # each tensor with its own threshold; election and majority as before (global)
        one = {}
        for name, tensor in tau.items():
            flat = tensor.float().reshape(-1)
            rank = flat.numel() - math.floor(k * flat.numel())
            thr = flat.abs().kthvalue(rank).values if rank >= 1 else 0.0
            one[name] = tensor.float() * (tensor.float().abs() >= thr)
        trimmed.append(one)
    merged = steps("ties", taus, MergeParams(ties_k=k, ties_scope="tensor"))[-1]
    expected = ties_oracle(trimmed, 1.0, None)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_ties_reference_caveat_full_model_denominator_keeps_more_entries() -> None:
    tau = {"w": torch.arange(1.0, 101.0)}  # 100 stored entries of a 250-entry model
    full = steps("ties", [tau], MergeParams(ties_k=0.2, ties_denominator=250))[0]["w"]
    stored = steps("ties", [tau], MergeParams(ties_k=0.2))[0]["w"]
    # k_keep = floor(0.2 * 250) = 50: threshold is the 50th smallest -> 51 entries kept; stored: 21
    assert int((full != 0).sum()) == 51 and int((stored != 0).sum()) == 21


def test_magmax_ties_go_to_the_latest_task_and_keep_the_sign() -> None:
    taus = [{"w": torch.tensor([1.0, -2.0, 0.0, 3.0])}, {"w": torch.tensor([-1.0, 2.0, 0.0, -1.0])},
            {"w": torch.tensor([0.5, -2.0, -0.0, 0.0])}]
    assert steps("magmax", taus)[-1]["w"].tolist() == [-1.0, -2.0, 0.0, 3.0]


def test_averaging_is_order_invariant_and_magmax_under_ties_is_not() -> None:
    a, b = {"w": torch.tensor([1.0, -3.0, 2.0])}, {"w": torch.tensor([-1.0, 1.0, 2.0])}
    assert torch.equal(steps("average", [a, b])[-1]["w"], steps("average", [b, a])[-1]["w"])
    # |1| = |-1|: the later task wins the tie, so swapping the order flips the sign of entry 0
    assert steps("magmax", [a, b])[-1]["w"][0] == -1.0 and steps("magmax", [b, a])[-1]["w"][0] == 1.0


def test_random_mix_draws_each_entry_from_a_uniform_task_reproducibly() -> None:
    taus = [{"w": torch.full((20000,), float(i + 1))} for i in range(4)]
    merged = steps("random_mix", taus, MergeParams(seed=3))
    shares = torch.bincount(merged[-1]["w"].long(), minlength=5)[1:].float() / 20000
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.02)
    assert torch.equal(merged[0]["w"], taus[0]["w"])
    assert torch.equal(steps("random_mix", taus, MergeParams(seed=3))[-1]["w"], merged[-1]["w"])
    assert not torch.equal(steps("random_mix", taus, MergeParams(seed=4))[-1]["w"], merged[-1]["w"])


def test_dare_drops_with_probability_p_and_rescales_the_rest() -> None:
    taus = [{"w": torch.full((40000,), 2.0)}]
    dropped = steps("dare", taus, MergeParams(dare_p=0.75))[0]["w"]
    assert set(dropped.unique().tolist()) == {0.0, 8.0}  # 2 / (1 - 0.75)
    assert abs(float((dropped != 0).float().mean()) - 0.25) < 0.02
    assert abs(float(dropped.mean()) - 2.0) < 0.1  # unbiased


def test_dare_composes_with_other_combiners() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [{"w": torch.randint(-3, 4, (500,), generator=g).float()} for _ in range(3)]
    params = MergeParams(dare_p=0.5, seed=1)
    sparse = [{"w": steps("dare", [tau], params)[0]["w"]} for tau in taus]  # task 1's draws, for every task
    assert steps("dare_magmax", taus[:1], params)[0]["w"].equal(sparse[0]["w"])
    assert METHODS["dare_ties"].combiner is METHODS["ties"].combiner
    assert METHODS["dare_magmax"].combiner is METHODS["magmax"].combiner


@pytest.mark.parametrize(("composite", "base"), [("dare", "task_arithmetic"), ("dare_magmax", "magmax"),
                                                  ("dare_average", "average"), ("dare_ties", "ties")])
def test_dare_composites_equal_the_base_method_on_dare_sparsified_vectors(composite: str, base: str) -> None:
    """dare_<m> over T = 3 tasks = DARE on each tau_t on its own (its (seed, tensor, t) generator), then m.

    DARE replaces TIES' top-k trim: dare_ties is the sign-elected disjoint mean of the DARE vectors with
    nothing trimmed further, i.e. ties with k = 1 (keep all) on them (as mergekit's dare_ties)."""
    g = torch.Generator().manual_seed(11)
    shapes = {"a.weight": (9, 7), "b.bias": (13,), "c.weight": (3, 4, 5)}
    taus = [{name: torch.randn(shape, generator=g) for name, shape in shapes.items()} for _ in range(3)]
    params = MergeParams(seed=5, dare_p=0.3)
    sparse = [{name: Dare(params.dare_p)(tensor, Step(name, t, len(taus), params.seed)) for name, tensor in tau.items()}
              for t, tau in enumerate(taus, start=1)]
    # the draws really differ per task and per tensor, and drop something: the check below is not vacuous
    keeps = [{name: tensor != 0 for name, tensor in tau.items()} for tau in sparse]
    assert not torch.equal(keeps[0]["a.weight"], keeps[1]["a.weight"])
    assert all(0 < int(keep.sum()) < keep.numel() for kept in keeps for keep in kept.values())
    base_params = MergeParams(seed=params.seed, ties_k=1.0)  # plain TIES on the DARE vectors: trim nothing more
    composed, expected = steps(composite, taus, params), steps(base, sparse, base_params)
    assert len(composed) == len(expected) == 3
    for t in range(3):
        for name in shapes:
            assert composed[t][name].shape == shapes[name]
            assert torch.equal(composed[t][name], expected[t][name]), (t + 1, name)
    final = merge_final(open_sources(taus), get_method(composite), params)  # the chunk-major path
    assert all(torch.equal(final[name], expected[-1][name]) for name in shapes)


def test_default_lambdas_follow_the_spec() -> None:
    expected = {"magmax": 0.5, "average": 1.0, "task_arithmetic": 0.3, "random_mix": 1.0, "ties": 0.55, "last": 1.0}
    assert {name: METHODS[name].default_alpha for name in expected} == expected


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(UserError, match="valid methods: magmax, average, task_arithmetic"):
        get_method("nope")
