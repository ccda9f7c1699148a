"""The streaming engine over safetensors files: equal to the in-memory fold bit for bit, exact TIES
thresholds on large vectors, untouched integer buffers, bad input, diagnostics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clmerge.errors import UserError
from clmerge.merging.diagnostics import diagnostics, layer_of
from clmerge.merging.engine import merge_final, merge_steps
from clmerge.merging.methods import METHODS, MergeParams, get_method
from clmerge.merging.select import kth_smallest_magnitude
from clmerge.merging.sources import open_sources

Vector = dict[str, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_vectors(num_tasks: int, seed: int = 0) -> list[Vector]:
    g = torch.Generator().manual_seed(seed)
    return [{"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(320, 300, generator=g),
             "visual.conv1.weight": torch.randn(8, 3, 4, 4, generator=g) * 0.1,
             "visual.ln_post.bias": torch.randn(7, generator=g)} for _ in range(num_tasks)]


def write(tmp_path: Path, vectors: list[Vector]) -> list[Path]:
    paths = []
    for i, vector in enumerate(vectors):
        paths.append(tmp_path / f"task_{i:03d}.safetensors")
        save_file(vector, str(paths[-1]))
    return paths


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_streaming_from_files_equals_the_in_memory_fold_bit_for_bit(tmp_path: Path, scope: str) -> None:
    vectors = random_vectors(3)
    paths = write(tmp_path, vectors)
    params = MergeParams(seed=5, ties_k=0.3, ties_scope=scope, ties_denominator=200_000)
    for name, method in METHODS.items():
        on_disk = [{k: v.clone() for k, v in m.items()} for _, m in merge_steps(open_sources(paths), method, params)]
        in_memory = [{k: v.clone() for k, v in m.items()} for _, m in merge_steps(open_sources(vectors), method,
                                                                                   params)]
        assert len(on_disk) == 3
        for a, b in zip(on_disk, in_memory):
            assert all(torch.equal(a[k], b[k]) for k in a), name


def test_final_only_equals_the_last_step() -> None:
    vectors = random_vectors(4, seed=1)
    for name in ("average", "ties", "random_mix"):
        steps = list(merge_steps(open_sources(vectors), get_method(name), MergeParams(seed=2)))
        final = merge_final(open_sources(vectors), get_method(name), MergeParams(seed=2))
        assert all(torch.equal(final[k], steps[-1][1][k]) for k in final)


def test_threshold_scans_on_several_threads_give_the_same_bits(tmp_path: Path) -> None:
    paths = write(tmp_path, random_vectors(4, seed=4))  # 96 K entries each: sampled thresholds, not kthvalue
    params = MergeParams(ties_k=0.2)

    def steps() -> list[Vector]:
        return [{k: v.clone() for k, v in m.items()} for _, m in merge_steps(open_sources(paths), METHODS["ties"],
                                                                              params)]

    serial, serial_final = steps(), merge_final(open_sources(paths), METHODS["ties"], params)
    torch.set_num_threads(3)  # three scans at once in a pool (restored by the fixture)
    pooled = steps()
    assert all(torch.equal(a[k], b[k]) for a, b in zip(serial, pooled) for k in a)
    pooled_final = merge_final(open_sources(paths), METHODS["ties"], params)
    assert all(torch.equal(serial_final[k], pooled_final[k]) for k in serial_final)


@pytest.mark.parametrize("k", [0.0, 0.05, 0.3, 0.999])
def test_global_threshold_on_a_large_vector_is_exact(k: float) -> None:
    vector = random_vectors(1, seed=3)[0]
    vector["visual.conv1.weight"][:2] = 0.5  # many exact duplicates
    merged = merge_final(open_sources([vector]), get_method("ties"), MergeParams(ties_k=k))
    flat = torch.cat([v.reshape(-1) for v in vector.values()])
    rank = flat.numel() - int(k * flat.numel())
    thr = flat.abs().kthvalue(rank).values
    for name, tensor in vector.items():  # one task: the disjoint mean is the trimmed vector itself
        assert torch.equal(merged[name], torch.where(tensor.abs() >= thr, tensor, 0.0))


def test_kth_smallest_magnitude_is_exact_with_duplicates_and_skew() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.zeros(50_000), torch.rand(100_000, generator=g).pow(8), torch.full((30_000,), 0.25)])
    values = values[torch.randperm(values.numel(), generator=g)]
    signed = torch.where(torch.rand(values.numel(), generator=g) < 0.5, -values, values)
    for dtype in (torch.float32, torch.bfloat16):  # numba's scan, torch's
        for rank in (1, 49_999, 50_001, 120_000, 150_001, 179_999, 180_000):
            expected = float(values.to(dtype).kthvalue(rank).values)
            assert kth_smallest_magnitude(signed.to(dtype), rank) == expected


def test_integer_and_boolean_buffers_pass_through_untouched(tmp_path: Path) -> None:
    vectors = random_vectors(3)
    for i, vector in enumerate(vectors):
        vector["visual.attn_mask"] = torch.tensor([True, False, True])
        vector["visual.position_ids"] = torch.arange(5, dtype=torch.int64) * 7
    paths = write(tmp_path, vectors)
    for name in ("magmax", "average", "ties", "dare"):
        for _, merged in merge_steps(open_sources(paths), get_method(name)):
            assert merged["visual.attn_mask"].dtype == torch.bool
            assert torch.equal(merged["visual.attn_mask"], vectors[0]["visual.attn_mask"])
            assert torch.equal(merged["visual.position_ids"], vectors[0]["visual.position_ids"])


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda v: v.pop("visual.ln_post.bias"), "tensor visual.ln_post.bias is in"),
    (lambda v: v.update({"visual.ln_post.bias": torch.zeros(8)}), r"visual.ln_post.bias is torch.float32\[7\]"),
    (lambda v: v.update({"visual.ln_post.bias": torch.zeros(7, dtype=torch.float16)}), "torch.float16\\[7\\] in"),
])
def test_mismatched_checkpoints_name_the_first_key_and_both_files(tmp_path: Path, change, fragment: str) -> None:
    vectors = random_vectors(2)
    change(vectors[1])
    paths = write(tmp_path, vectors)
    with pytest.raises(UserError, match=fragment) as err:
        list(merge_steps(open_sources(paths), get_method("magmax")))
    assert str(paths[0]) in str(err.value) and str(paths[1]) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_entries_are_refused_naming_file_and_key(tmp_path: Path, bad: float) -> None:
    vectors = random_vectors(2)
    vectors[1]["visual.conv1.weight"][0, 0, 0, 0] = bad
    paths = write(tmp_path, vectors)
    for name in ("magmax", "ties"):
        with pytest.raises(UserError, match=f"{paths[1]} has non-finite entries .* in visual.conv1.weight"):
            list(merge_steps(open_sources(paths), get_method(name)))
    almost_all_dropped = MergeParams(dare_p=0.999)  # DARE would drop the bad entry before the fold saw it
    for name in ("dare", "dare_magmax", "dare_ties"):
        for every_step in (True, False):
            with pytest.raises(UserError, match=f"{paths[1]} has non-finite entries .* in visual.conv1.weight"):
                list(merge_steps(open_sources(paths), get_method(name), almost_all_dropped, every_step))


def test_not_a_safetensors_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"garbage!garbage")
    with pytest.raises(UserError, match="is not a safetensors file"):
        open_sources([tmp_path / "x.safetensors"])


def test_diagnostics_count_sign_conflicts_and_magmax_owners() -> None:
    taus = [{"blocks.0.w": torch.tensor([1.0, -1.0, 0.0, 2.0])}, {"blocks.0.w": torch.tensor([-1.0, -2.0, 1.0, 2.0])}]
    merged = merge_final(open_sources(taus), get_method("magmax"))
    found = diagnostics(open_sources(taus), merged, owners=True)
    assert found["pairwise"] == [[0.0, 0.25], [0.25, 0.0]]  # entry 0 only; zeros never conflict
    assert found["against_merge"] == [0.25, 0.0]  # merged = [-1, -2, 1, 2]
    assert found["contribution_share"] == [0.0, 1.0]  # every tie goes to the later task
    assert found["per_layer"]["blocks.0"]["entries"] == 4
    assert layer_of("visual.transformer.resblocks.3.attn.in_proj_weight") == "visual.transformer.resblocks.3"
    assert layer_of("visual.conv1.weight") == "visual.conv1" and layer_of("visual.proj") == "visual.proj"
