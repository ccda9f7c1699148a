"""PAM's alignment on hand-made tensors, PAM runs through the pipeline, and LoRA adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import files_under
from rich.console import Console
from test_cli import assert_one_line_error
from test_pipeline import tiny_cfg

from clmerge import pipeline
from clmerge.config import Config, LoraConfig, ModelConfig, PamConfig
from clmerge.merging.engine import merge_final
from clmerge.merging.job import fold, full_model_entries, merge_params
from clmerge.merging.methods import MergeParams, get_method
from clmerge.merging.sources import MemoryVector
from clmerge.models.heads import logits
from clmerge.models.loading import load_model
from clmerge.models.lora import Adapters, check_lora, dense_delta, init_factors
from clmerge.models.tower import load_tower, snapshot
from clmerge.store import BASE_FILE, finetune_dir, global_file, lora_file, task_file
from clmerge.training.pam import AlignmentLog, align, top_masks

QUIET = Console(quiet=True)


def test_top_masks_per_tensor_and_global_keep_ties_at_the_threshold() -> None:
    phi = {"a": torch.tensor([3.0, -1.0, 2.0, -4.0]), "b": torch.tensor([0.5, -2.0])}
    per_tensor = top_masks(phi, 0.5, "tensor")  # a: 2 of 4 (|4|, |3|); b: 1 of 2 (|-2|)
    assert per_tensor["a"].tolist() == [True, False, False, True] and per_tensor["b"].tolist() == [False, True]
    glob = top_masks(phi, 0.5, "global")  # 3 of 6: 4, 3, then the tie 2 / -2 keeps both
    assert glob["a"].tolist() == [True, False, True, True] and glob["b"].tolist() == [False, True]
    assert not any(m.any() for m in top_masks(phi, 0.0, "tensor").values())
    assert all(m.all() for m in top_masks(phi, 1.0, "global").values())


@pytest.mark.parametrize("reset, expected", [("zero", [10.0, 10.0, 10.0, 10.0]), ("global", [10.0, 10.0, 12.0, 6.0])])
def test_align_resets_only_protected_sign_conflicts(reset: str, expected: list[float]) -> None:
    base = torch.full((4,), 10.0)
    phi = {"w": torch.tensor([1.0, -0.1, 2.0, -4.0])}
    masks = {"w": torch.tensor([True, False, True, True])}
    # psi = param - base = [0, 0.5, -1, 3]: entry 0 is zero (no conflict), 1 conflicts but is unprotected
    param = torch.nn.Parameter(base + torch.tensor([0.0, 0.5, -1.0, 3.0]))
    log = AlignmentLog()
    moments = [torch.ones(4), torch.ones(4)]
    align({"w": param}, {"w": base}, phi, masks, reset, log, {"w": moments})
    want = torch.tensor(expected)
    want[1] = 10.5  # unprotected: kept
    assert param.detach().tolist() == want.tolist()
    assert moments[0].tolist() == [1.0, 1.0, 0.0, 0.0] and moments[1].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert log.to_json()["misaligned_before"] == pytest.approx(2 / 3)


def test_align_on_lora_factors_has_no_offset() -> None:
    factor = torch.nn.Parameter(torch.tensor([[1.0, -2.0]]))
    align({"f": factor}, {"f": None}, {"f": torch.tensor([[-1.0, -1.0]])}, {"f": torch.tensor([[True, True]])},
          "global", AlignmentLog())
    assert factor.detach().tolist() == [[-1.0, -2.0]]


def pam_cfg(tmp_path: Path, **pam: object) -> Config:
    cfg = tiny_cfg(tmp_path, regime="pam")
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, steps=4, pam=PamConfig(every=2, **pam)))


def test_pam_with_p_zero_is_clone_then_pairwise_average(tmp_path: Path) -> None:
    cfg = pam_cfg(tmp_path, p=0.0)
    pipeline.finetune(cfg, QUIET)
    store = finetune_dir(cfg)
    psi = [store.load(task_file(i)) for i in range(3)]
    phi = [store.load(global_file(i)) for i in range(3)]
    for key in psi[0]:
        assert torch.equal(phi[0][key], psi[0][key])
        assert torch.equal(phi[1][key], (psi[0][key] + psi[1][key]) * 0.5)
        assert torch.equal(phi[2][key], (phi[1][key] + psi[2][key]) * 0.5)
    assert "pam" not in store.info(task_file(1))  # no alignment ever ran
    # the deployed PAM model after each step (eval's fold of the `pam` method) is phi_t
    for t, merged in fold(cfg, "pam", 3):
        assert all(torch.equal(merged[k], phi[t - 1][k]) for k in merged)


def test_pam_with_p_one_leaves_no_protected_conflict_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = pam_cfg(tmp_path, p=1.0, reset="zero")
    pipeline.finetune(cfg, QUIET)
    store = finetune_dir(cfg)
    record = store.info(task_file(2))["pam"]
    assert record["alignments"] == 2 and record["misaligned_before"] > 0  # steps 2 and 4 of 4
    assert record["conflict_rate_protected"] == 0.0 and set(record["conflict_rate_by_layer"])
    hashes = {name: info["sha256"] for name, info in store.manifest["files"].items()}
    for name in (task_file(2), global_file(2)):  # crash during the last task
        (store.path / name).unlink()
        del store.manifest["files"][name]
    store.write_manifest()
    pipeline.finetune(cfg, QUIET)
    assert {name: info["sha256"] for name, info in finetune_dir(cfg).manifest["files"].items()} == hashes


def test_lora_adapters_equal_their_dense_delta_and_detach_cleanly() -> None:
    loaded = load_model(ModelConfig(pretrained="none"), "cpu")
    model = loaded.model
    base = snapshot(model)
    sites = check_lora(LoraConfig(r=4), model)
    factors = {k: torch.randn_like(v) for k, v in init_factors(sites, 4, seed=0).items()}  # B != 0
    images = torch.randn(3, 3, 32, 32)
    head = torch.randn(5, 64)
    adapters = Adapters(sites, LoraConfig(r=4))
    adapters.load(factors)
    with torch.no_grad():
        adapted = logits(model, head, images)
    adapters.detach()
    assert all(torch.equal(v, base[k]) for k, v in snapshot(model).items())  # W_0 exactly
    load_tower(model, base, dense_delta(factors, base, 32.0 / 4))
    with torch.no_grad():
        dense = logits(model, head, images)
    assert torch.allclose(adapted, dense, atol=1e-5)


def lora_cfg(tmp_path: Path, regime: str = "sequential") -> Config:
    cfg = tiny_cfg(tmp_path, regime=regime, adapter="lora", lora=LoraConfig(r=4, lr=1e-2))
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, pam=PamConfig(every=1)))


def test_lora_run_stores_factors_and_merging_products_equals_merging_dense_deltas(tmp_path: Path) -> None:
    cfg = lora_cfg(tmp_path)
    pipeline.finetune(cfg, QUIET)
    store = finetune_dir(cfg)
    base = store.load(BASE_FILE)
    factors = [store.load(lora_file(i)) for i in range(3)]
    assert all(any(v.abs().sum() > 0 for k, v in f.items() if k.endswith("lora_B")) for f in factors)  # learned
    dense = [dense_delta(f, base, 32.0 / 4) for f in factors]
    for i in range(3):
        assert all(torch.equal(store.load(task_file(i))[k], dense[i][k]) for k in base)
    # sequential LoRA: task 2 starts from task 1's factors, so its factors moved on from them
    assert not torch.equal(factors[1][next(iter(factors[1]))], factors[0][next(iter(factors[0]))])
    *_, (_, merged) = fold(cfg, "magmax", 3)
    expected = merge_final([MemoryVector(d) for d in dense], get_method("magmax"), MergeParams())
    assert all(torch.equal(merged[k], expected[k]) for k in merged)


def test_pam_on_lora_merges_factors_and_deploys_their_product(tmp_path: Path) -> None:
    cfg = lora_cfg(tmp_path, regime="pam")
    pipeline.finetune(cfg, QUIET)
    store = finetune_dir(cfg)
    phi = store.load(global_file(2))
    assert set(phi) == set(store.load(lora_file(0)))  # the global vector lives in factor space
    *_, (_, merged) = fold(cfg, "pam", 3)
    expected = dense_delta(phi, store.load(BASE_FILE), 32.0 / 4)
    assert all(torch.equal(merged[k], expected[k]) for k in merged)


@pytest.mark.parametrize("args, fragments", [
    (["finetune", "finetune=pam", "finetune.pam.p=1.5"], ["finetune.pam.p", "[0, 1]"]),
    (["finetune", "finetune=pam", "finetune.pam.every=0"], ["finetune.pam.every", "at least 1"]),
    (["finetune", "finetune=pam", "finetune.pam.scope=layer"], ["finetune.pam.scope", "tensor or global"]),
    (["run", "finetune.adapter=lora", "finetune.lora.r=0"], ["finetune.lora.r=0", "1..64"]),
    (["run", "finetune.adapter=lora", "finetune.lora.r=65"], ["finetune.lora.r=65", "1..64"]),
    (["run", "finetune.adapter=lora", "finetune.lora.targets=[mlp.c_fc,attn.qkv]"],
     ["'attn.qkv'", "available: attn.in_proj, attn.out_proj"]),
])
def test_bad_pam_and_lora_knobs_are_one_line_errors(cli, paths, tmp_path: Path, args: list[str],
                                                    fragments: list[str]) -> None:
    assert_one_line_error(cli(*args, *paths), *fragments)
    assert files_under(tmp_path) == []


def test_ties_on_lora_factors_trims_over_the_stored_factors_not_the_dense_model(tmp_path: Path) -> None:
    ties = get_method("ties")
    factors = merge_params(lora_cfg(tmp_path, regime="pam"), ties)  # PAM merges factors
    assert factors.ties_denominator is None  # N_ref = the factors' own entries: the full model's would keep all
    dense = merge_params(lora_cfg(tmp_path), ties)  # plain LoRA merges the dense products
    assert dense.ties_denominator == full_model_entries(lora_cfg(tmp_path).model)
