"""Model configs and every form of model.pretrained: tag (offline: one line, fast), files, local-dir."""

from __future__ import annotations

import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clmerge.config import ModelConfig
from clmerge.errors import UserError
from clmerge.hydra_app import compose_config
from clmerge.models.loading import load_model


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    """The state dict of a random world-tiny model."""
    return {k: v.clone() for k, v in load_model(ModelConfig(pretrained="none"), init_seed=7).model.state_dict().items()}


def same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("option", "name"), [("vit_b16", "ViT-B-16-quickgelu"), ("vit_b32", "ViT-B-32-quickgelu"),
                                              ("vit_l14", "ViT-L-14-quickgelu")])
def test_model_configs_name_openai_quickgelu_models(option: str, name: str) -> None:
    model = compose_config([f"model={option}"]).model
    assert (model.name, model.pretrained) == (name, "openai")
    assert (name, "openai") in open_clip.list_pretrained()


def test_safetensors_and_pt_state_dicts_load_bit_identically(tmp_path: Path, tiny) -> None:
    save_file({k: v.contiguous() for k, v in tiny.items()}, tmp_path / "w.safetensors")
    torch.save(tiny, tmp_path / "w.pt")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        assert same(load_model(ModelConfig(pretrained=str(path))).model, tiny)


def test_local_dir_loads_config_and_weights(tmp_path: Path, tiny) -> None:
    world = json.loads((Path(__file__).resolve().parents[1] / "src" / "clmerge" / "assets" / "model_configs" /
                        "world-tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": world, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tiny.items()}, tmp_path / "open_clip_model.safetensors")
    assert same(load_model(ModelConfig(name="my-tiny", pretrained=f"local-dir:{tmp_path}")).model, tiny)
    with pytest.raises(UserError, match="holds no open_clip_config.json"):
        load_model(ModelConfig(pretrained=f"local-dir:{tmp_path / 'nowhere'}"))


def test_pickled_modules_are_refused(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        load_model(ModelConfig(pretrained=str(tmp_path / "module.pt")))


def test_a_tag_offline_fails_fast_with_one_line_naming_the_local_file_option() -> None:
    start = time.perf_counter()
    with pytest.raises(UserError) as caught:
        load_model(ModelConfig(name="ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - start < 20
    message = str(caught.value)
    assert "\n" not in message and "cannot fetch the 'openai' weights" in message
    assert "model.pretrained=/path/to/" in message


@pytest.mark.parametrize(("cfg", "message"), [
    (ModelConfig(name="ViT-B-32", pretrained="not-a-tag"), "not a pretrained tag of ViT-B-32"),
    (ModelConfig(name="ViT-B-32", pretrained="/no/such.safetensors"), "does not exist"),
    (ModelConfig(name="ViT-Q-99", pretrained="openai"), "unknown model 'ViT-Q-99'")])
def test_bad_pretrained_values_are_one_line_errors(cfg: ModelConfig, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_model(cfg)


def test_cli_offline_tag_is_exit_2_and_one_line(cli, tmp_path: Path) -> None:
    result = cli("finetune", "model=vit_b32", "model.name=ViT-B-32", f"paths.store={tmp_path / 's'}",
                 f"paths.output={tmp_path / 'o'}")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot fetch the 'openai' weights of ViT-B-32" in result.stderr
