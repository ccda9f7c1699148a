"""The built-in world: deterministic rendering, split streams, captions, and the tiny CLIP's pretraining."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from clmerge.config import PretrainConfig  # noqa: E402
from clmerge.data import world  # noqa: E402
from clmerge.models.loading import builtin_weights, register_builtin_configs  # noqa: E402
from clmerge.training.pretrain import pretrain  # noqa: E402


def test_api_constants():
    assert len(world.CLASSNAMES) >= 20 and len(set(world.CLASSNAMES)) == len(world.CLASSNAMES)
    assert "plain" in world.DOMAINS and len(world.DOMAINS) >= 4
    assert "world" in world.TEMPLATES
    for templates in world.TEMPLATES.values():
        assert templates and all("{c}" in t for t in templates)


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_render_split_shapes_labels_and_determinism(domain):
    classes = [7, 2, 19]
    x, y = world.render_split(classes, domain, per_class=3, seed=5, split="train")
    assert x.shape == (9, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [7] * 3 + [2] * 3 + [19] * 3  # global labels
    x2, y2 = world.render_split(classes, domain, per_class=3, seed=5, split="train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.float().std() > 5  # not blank


def test_images_do_not_depend_on_the_other_classes():
    x_all, y_all = world.render_split(range(20), "blur", 2, seed=1, split="test")
    x_one, _ = world.render_split([13], "blur", 2, seed=1, split="test")
    assert torch.equal(x_all[y_all == 13], x_one)


def test_splits_and_seeds_give_disjoint_streams():
    def flat(split, seed):
        return {bytes(im.numpy().tobytes()) for im in world.render_split(range(20), "plain", 5, seed, split)[0]}

    train, val, test = flat("train", 0), flat("val", 0), flat("test", 0)
    assert len(train) == 100 and not (train & val) and not (train & test) and not (val & test)
    assert not (train & flat("train", 1))


def test_unknown_domain_and_class_are_rejected():
    with pytest.raises(ValueError, match="unknown world domain"):
        world.render_split([0], "watercolour", 1, 0, "train")
    with pytest.raises(ValueError, match="out of range"):
        world.render_split([len(world.CLASSNAMES)], "plain", 1, 0, "train")


def test_render_pairs_captions_mention_the_class_and_domain():
    mix = {"plain": 0.5, "blur": 0.5}
    images, captions = world.render_pairs(40, seed=3, mix=mix)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8 and len(captions) == 40
    images2, captions2 = world.render_pairs(40, seed=3, mix=mix)
    assert torch.equal(images, images2) and captions == captions2
    prefixes = world.PREFIXES["plain"] + world.PREFIXES["blur"]
    for text in captions:
        assert sum(f" {name}" in text for name in world.CLASSNAMES) >= 1
        assert text.startswith(prefixes)
    assert any(text.startswith(world.PREFIXES["blur"]) for text in captions)


def test_render_pairs_range_matches_render_pairs():
    mix = {"noise": 1.0, "outline": 2.0}
    images, captions = world.render_pairs(10, seed=0, mix=mix)
    part, part_captions = world.render_pairs_range(4, 10, seed=0, mix=mix)
    assert np.array_equal(images[4:].numpy(), part) and captions[4:] == part_captions


def test_to_model_input_normalises():
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = world.to_model_input(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected = (1 - torch.tensor(world.NORMALIZE_MEAN)) / torch.tensor(world.NORMALIZE_STD)
    assert torch.allclose(out[0, :, 0, 0], expected)
    assert world.NORMALIZE_MEAN == open_clip.OPENAI_DATASET_MEAN
    assert world.NORMALIZE_STD == open_clip.OPENAI_DATASET_STD


def _load(path: Path) -> torch.nn.Module:
    register_builtin_configs()
    model, _, _ = open_clip.create_model_and_transforms("world-tiny", pretrained=str(path))
    return model


def test_pretrain_two_steps_writes_loadable_safetensors(tmp_path):
    cfg = replace(PretrainConfig(), output=str(tmp_path / "w.safetensors"), steps=2, batch_size=8,
                  num_pairs=24, warmup_steps=1, workers=1, threads=2)
    path = pretrain(cfg, Console(quiet=True))
    assert path == tmp_path / "w.safetensors" and path.stat().st_size <= 15_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    stored = load_file(str(path))
    model = _load(path)
    state = model.state_dict()
    assert set(stored) == set(state)
    for key, value in stored.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key
    tokens = open_clip.get_tokenizer("world-tiny")(["a blurry photo of a star."])
    assert tokens.shape == (1, 24) and int(tokens.max()) < 49408


def test_shipped_weights_load():
    path = builtin_weights()
    assert path.stat().st_size <= 15_000_000
    model = _load(path)
    x = world.to_model_input(world.render_split([0, 1], "plain", 2, 0, "test")[0])
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(x)).all()
