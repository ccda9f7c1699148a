"""`clmerge merge` over a real tiny fine-tuning run: stored merges with diagnostics, alpha=auto on
validation data, and --export loading in open_clip with the merged model's logits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from clmerge import pipeline
from clmerge.config import (BenchmarkConfig, Config, FinetuneConfig, MergeConfig, ModelConfig, PathsConfig,
                            WorldDataConfig)
from clmerge.data.registry import derived_seed
from clmerge.errors import UserError
from clmerge.hydra_app import compose_config
from clmerge.merging.alpha import AlphaCurve, parse_alpha
from clmerge.merging.job import fold, full_model_entries, merge_params, record_auto
from clmerge.merging.methods import get_method
from clmerge.models.loading import load_model, meta_model, register_builtin_configs
from clmerge.models.tower import load_tower, trained_parameters
from clmerge.store import BASE_FILE, FINAL_FILE, CheckpointDir, finished_finetune, step_file, task_file

QUIET = Console(quiet=True)


def with_merge(cfg: Config, **merge: object) -> Config:
    return dataclasses.replace(cfg, merge=dataclasses.replace(cfg.merge, **merge))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("merge-job")
    benchmark = BenchmarkConfig(name="cil-tiny", setting="class_incremental", dataset="world", templates="world",
                                num_tasks=3, world=WorldDataConfig(domain="blur", train_per_class=4,
                                                                   val_per_class=2, test_per_class=2))
    recipe = FinetuneConfig(lr=1e-3, weight_decay=0.0, batch_size=16, steps=2, warmup_steps=1)
    cfg = Config(benchmark=benchmark, model=ModelConfig(pretrained="none"), finetune=recipe, merge=MergeConfig(),
                 paths=PathsConfig(store=str(root / "store"), output=str(root / "out")), threads=1)
    pipeline.finetune(cfg, QUIET)
    return cfg


@pytest.fixture
def copied(finetuned: Config, tmp_path: Path) -> Config:
    """The fine-tuned run (no merges) in a store of the test's own, which the test may damage."""
    store = tmp_path / "store"
    shutil.copytree(finetuned.paths.store, store, ignore=shutil.ignore_patterns("merge"))
    return dataclasses.replace(finetuned, paths=dataclasses.replace(finetuned.paths, store=str(store)))


def test_merge_stores_the_final_vector_and_diagnostics_only(finetuned: Config, tmp_path: Path) -> None:
    [path] = pipeline.merge(finetuned, QUIET, output_dir=tmp_path).values()
    manifest = json.loads((path / "manifest.json").read_text())
    assert FINAL_FILE in manifest["files"] and step_file(1) not in manifest["files"]
    found = manifest["diagnostics"]
    assert len(found["pairwise"]) == 3 and len(found["against_merge"]) == 3
    assert sum(found["contribution_share"]) == pytest.approx(1.0, abs=1e-5)
    assert any(layer.startswith("visual.transformer.resblocks.") for layer in found["per_layer"])
    with_steps = with_merge(finetuned, save_steps=True)
    pipeline.merge(with_steps, QUIET)
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(step_file(t) in manifest["files"] for t in (1, 2, 3))


def test_alpha_auto_picks_lambda_on_validation_data_and_records_the_curve(finetuned: Config, tmp_path: Path) -> None:
    cfg = with_merge(finetuned, method="average", alpha="auto", alpha_grid=[0.5, 1.0])
    pipeline.merge(cfg, QUIET, output_dir=tmp_path)
    record = json.loads((tmp_path / "merge.json").read_text())["methods"]["average"]
    curve = record["alpha_auto"]
    assert curve["grid"] == [0.5, 1.0] and len(curve["accuracy"]) == 2 and record["alpha"] in (0.5, 1.0)
    assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])


def test_a_stored_curve_is_reused_only_for_the_same_validation_images(copied: Config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = with_merge(copied, method="average", alpha="auto", alpha_grid=[0.5, 1.0])
    pipeline.merge(cfg, QUIET)
    more = dataclasses.replace(cfg.benchmark, world=dataclasses.replace(cfg.benchmark.world, val_per_class=3))
    recomputed = []
    monkeypatch.setattr("clmerge.merging.job.alpha_curve",
                        lambda *args: recomputed.append(1) or AlphaCurve([0.5, 1.0], [0.1, 0.2], 1.0, {"n": 3}))
    pipeline.merge(cfg, QUIET)  # the same images: the stored curve
    assert recomputed == []
    pipeline.merge(dataclasses.replace(cfg, benchmark=more), QUIET, output_dir=tmp_path)  # other images, one key
    assert recomputed == [1]
    assert json.loads((tmp_path / "merge.json").read_text())["methods"]["average"]["alpha_auto"]["validation"] == {
        "n": 3}


def test_alpha_auto_without_a_validation_split_is_one_clear_line(finetuned: Config) -> None:
    world = dataclasses.replace(finetuned.benchmark.world, val_per_class=0)
    cfg = with_merge(dataclasses.replace(finetuned, benchmark=dataclasses.replace(finetuned.benchmark, world=world)),
                     alpha="auto")
    from clmerge.merging.alpha import check_validation_split

    with pytest.raises(UserError, match="benchmark.world.val_per_class=N") as err:
        check_validation_split(cfg)
    assert "\n" not in str(err.value)


def clip_logits(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits per image, image features, text features, logit scale) from open_clip's forward."""
    out = model(images, tokens)
    assert isinstance(out, tuple) and len(out) == 3  # no logit_bias, no output_dict
    image_features, text_features, logit_scale = out
    return logit_scale * image_features @ text_features.T, image_features, text_features, logit_scale


def test_export_loads_in_open_clip_and_gives_the_merged_models_logits(finetuned: Config, tmp_path: Path) -> None:
    target = tmp_path / "merged.safetensors"
    cfg = with_merge(finetuned, method="ties", alpha=0.7, export=str(target))
    pipeline.merge(cfg, QUIET, output_dir=tmp_path)
    assert json.loads((tmp_path / "merge.json").read_text())["methods"]["ties"]["export"] == str(target)
    register_builtin_configs()
    exported = open_clip.create_model(cfg.model.name, pretrained=str(target)).eval()
    ours = load_model(cfg.model, "cpu", init_seed=derived_seed(cfg.seed, "init")).model.eval()
    *_, (_, final) = fold(cfg, "ties", cfg.benchmark.num_tasks)
    load_tower(ours, finished_finetune(cfg, 3).load(BASE_FILE), final, scale=0.7)
    # the checkpoint is the whole state dict (text side and logit_scale included), equal to the merged model's
    written = load_file(target)
    state = ours.state_dict()
    assert set(written) == set(state) and any(not name.startswith("visual.") for name in written)
    assert all(torch.equal(written[name], state[name]) for name in state)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(cfg.model.name)(["a photo", "a shape", "a red circle"])
    with torch.no_grad():
        got, want = clip_logits(exported, images, tokens), clip_logits(ours, images, tokens)
    logits, image_features, text_features, logit_scale = got
    assert logits.shape == (4, 3) and text_features.shape[0] == 3
    assert not torch.equal(text_features[0], text_features[1])  # the text tower tells the prompts apart
    for name, a, b in zip(("logits", "image features", "text features", "logit_scale"), got, want):
        assert torch.equal(a, b), name
    assert float(logit_scale) == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init, untouched by the merge


def test_export_must_be_safetensors(finetuned: Config, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"\*.safetensors"):
        pipeline.merge(with_merge(finetuned, export=str(tmp_path / "merged.pt")), QUIET)


@pytest.mark.parametrize(("option", "total", "visual"), [("vit_b16", 149_620_737, 86_192_640),
                                                         ("vit_b32", 151_277_313, 87_849_216)])
def test_full_model_entries_of_the_vit_configs_are_the_spec_reference_counts(option: str, total: int,
                                                                            visual: int) -> None:
    """SPEC.md 0 and 2.2: TIES' N_ref is every floating entry of the full CLIP state dict (302 tensors for
    ViT-B/16), the visual tower alone is the trained part; counted on the meta device (no weights)."""
    cfg = compose_config([f"model={option}"])
    assert full_model_entries(cfg.model) == total
    model = meta_model(cfg.model)
    floating = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
    assert len(floating) == 302 and all(t.device.type == "meta" for t in floating)
    assert sum(p.numel() for p in trained_parameters(model).values()) == visual
    assert merge_params(cfg, get_method("ties")).ties_denominator == total  # k_denominator=full_model (default)


def test_a_store_that_cannot_be_written_keeps_the_curve_out_of_it_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def read_only(self: CheckpointDir, wait: bool = True) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(CheckpointDir, "lock", read_only)
    curve = AlphaCurve([0.5, 1.0], [0.25, 0.5], 1.0)
    with caplog.at_level("WARNING"):
        assert record_auto(CheckpointDir(tmp_path / "merge", {}), curve) == {"alpha_auto": curve.to_json()}
    assert "Permission denied" in caplog.text and not (tmp_path / "merge").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, False, "nan", "-inf", "fast", [1]])
def test_parse_alpha_refuses_what_is_not_a_finite_number(value: object) -> None:
    with pytest.raises(UserError, match=r"is not a finite number; use a number"):
        parse_alpha(value)


def test_parse_alpha_takes_finite_numbers_null_and_auto() -> None:
    assert [parse_alpha(v) for v in (0.5, "0.25", 2, -1.5, None, "auto")] == [0.5, 0.25, 2.0, -1.5, None, "auto"]


@pytest.mark.parametrize("where", ["folder", "store"])
def test_export_refuses_a_folder_and_a_file_of_the_store(copied: Config, tmp_path: Path, where: str) -> None:
    source = finished_finetune(copied, 3)
    checkpoint = source.path / task_file(0)
    before = checkpoint.read_bytes()
    target, fragment = checkpoint, "is inside the checkpoint store"
    if where == "folder":
        target, fragment = tmp_path / "d.safetensors", "is a folder"
        target.mkdir()
    with pytest.raises(UserError, match=fragment):
        pipeline.merge(with_merge(copied, export=str(target)), QUIET)
    assert checkpoint.read_bytes() == before and target.exists()


def test_export_may_go_beside_the_stores_own_folders(tmp_path: Path) -> None:
    from clmerge.merging.export import check_export_path

    (tmp_path / "exports").mkdir()
    check_export_path(tmp_path / "exports" / "m.safetensors", tmp_path)  # paths.store=a general folder: fine
    (tmp_path / "merge").mkdir()
    with pytest.raises(UserError, match="outside its finetune/, merge/ and heads/ folders"):
        check_export_path(tmp_path / "merge" / "m.safetensors", tmp_path)


def test_a_merge_stored_while_waiting_for_the_lock_is_reused(copied: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    from clmerge.merging import job

    pipeline.merge(copied, QUIET)  # another job's merge, finished while this one waited for the lock
    answers = iter([False])  # this job looked before it was stored
    real = job.is_stored
    monkeypatch.setattr(job, "is_stored", lambda target, names: next(answers, None) or real(target, names))
    monkeypatch.setattr(job, "merge_steps", lambda *args, **kwargs: pytest.fail("merged again"))
    assert pipeline.merge(copied, QUIET)


def test_a_damaged_stored_merge_is_refused_naming_it_and_remade_once_deleted(copied: Config) -> None:
    [path] = pipeline.merge(copied, QUIET).values()
    final = path / FINAL_FILE
    intact = final.read_bytes()
    with final.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(UserError) as err:
        pipeline.merge(copied, QUIET)
    assert str(err.value).startswith(f"{final} does not match its sha256") and "\n" not in str(err.value)
    final.unlink()
    pipeline.merge(copied, QUIET)
    assert final.read_bytes() == intact


def test_a_damaged_source_leaves_no_merge_folder(copied: Config) -> None:
    damaged = finished_finetune(copied, 3).path / task_file(2)
    with damaged.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(UserError, match=f"{damaged} does not match its sha256"):
        pipeline.merge(with_merge(copied, method="average"), QUIET)
    assert not (Path(copied.paths.store) / "merge").exists()
