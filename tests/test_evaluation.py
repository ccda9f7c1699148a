"""Evaluation inputs: test images decoded once (memory-mapped for real images) and cached zero-shot heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms

from clmerge.config import BenchmarkConfig
from clmerge.errors import UserError
from clmerge.evaluation.accuracy import count_correct
from clmerge.evaluation.control import controls
from clmerge.evaluation.testset import collect_test_set, split_normalize

EVAL = transforms.Compose([transforms.Resize(8), transforms.CenterCrop(8), transforms.ToTensor(),
                           transforms.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))])


class Pictures(Dataset):
    """Random RGB pictures through a transform, labels given."""

    def __init__(self, labels: list[int], transform, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(len(labels), 11, 13, 3), dtype=np.uint8)
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


class Probe(torch.nn.Module):
    """A fixed random linear 'image encoder' over flattened pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 6)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.flatten(1))


def test_memory_mapped_uint8_pixels_give_the_same_images_and_counts(tmp_path: Path) -> None:
    classes = [(0, 1, 2), (3, 4, 5)]
    labels = [[0, 1, 2, 0, 1], [3, 4, 5, 3]]
    direct = collect_test_set([Pictures(l, EVAL, i) for i, l in enumerate(labels)], classes, 6)
    pixels, normalize = split_normalize(EVAL)
    cache = tmp_path / "images.npy"
    mapped = collect_test_set([Pictures(l, pixels, i) for i, l in enumerate(labels)], classes, 6, cache=cache,
                              normalize=normalize)
    assert isinstance(mapped.images, np.memmap) and mapped.images.dtype == np.uint8
    assert cache.stat().st_size == 9 * 3 * 8 * 8 + 128  # uint8 pixels and the .npy header
    assert torch.equal(mapped.batch(2, 7), direct.batch(2, 7))  # bit-identical to transforming again
    assert mapped.sizes() == direct.sizes() == [5, 4]
    model, head = Probe(), torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    for batch_size in (2, 64):  # the batch size never changes results
        assert count_correct(model, head, mapped, batch_size, torch.device("cpu")) == count_correct(
            model, head, direct, 3, torch.device("cpu"))


def test_model_ready_tensors_stay_in_memory(tmp_path: Path) -> None:
    split = TensorDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    test = collect_test_set([split], [(0, 1)], 2, cache=tmp_path / "images.npy", normalize=EVAL.transforms[-1])
    assert isinstance(test.images, torch.Tensor) and torch.equal(test.images, split.tensors[0])
    assert not (tmp_path / "images.npy").exists()


def test_zero_shot_heads_are_cached_by_text_weights_and_prompts(tmp_path: Path, monkeypatch) -> None:
    from clmerge.benchmarks import build_benchmark
    from clmerge.config import BenchmarkConfig, ModelConfig
    from clmerge.evaluation import head_cache
    from clmerge.models.loading import load_model

    cpu = torch.device("cpu")
    loaded = load_model(ModelConfig(pretrained="none"), cpu, init_seed=0)
    benchmark = build_benchmark(BenchmarkConfig(name="w", setting="class_incremental", dataset="world",
                                                templates="world", num_tasks=2))
    head = head_cache.cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the head should come from the cache")

    monkeypatch.setattr(head_cache, "benchmark_head", must_not_run)
    assert torch.equal(head_cache.cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, tmp_path), head)
    key = head_cache.head_key(loaded.model, benchmark, cpu)
    with torch.no_grad():
        next(loaded.model.visual.parameters()).add_(1.0)  # the visual tower never changes the head
        assert head_cache.head_key(loaded.model, benchmark, cpu) == key
        loaded.model.logit_scale.add_(1.0)
        assert head_cache.head_key(loaded.model, benchmark, cpu) != key


@pytest.fixture(scope="module")
def head_inputs():
    """A random tiny CLIP, a two-task world benchmark and the CPU (the model is not changed by the tests)."""
    from clmerge.benchmarks import build_benchmark
    from clmerge.config import ModelConfig
    from clmerge.models.loading import load_model

    cpu = torch.device("cpu")
    benchmark = build_benchmark(BenchmarkConfig(name="w", setting="class_incremental", dataset="world",
                                                templates="world", num_tasks=2))
    return load_model(ModelConfig(pretrained="none"), cpu, init_seed=0), benchmark, cpu


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x10
    file.write_bytes(bytes(data))


def _without_checksum(file: Path) -> None:  # as clmerge wrote heads before they carried a checksum (here stale)
    from safetensors.torch import load_file, save_file

    save_file({"head": load_file(str(file))["head"] + 1}, str(file))


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, _without_checksum],
                         ids=["truncated", "bit-flip", "no-checksum"])
def test_a_damaged_cached_head_is_computed_again_and_rewritten(tmp_path: Path, head_inputs, damage,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from clmerge.evaluation import head_cache

    loaded, benchmark, cpu = head_inputs
    head = head_cache.cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, tmp_path)
    [file] = tmp_path.glob("*.safetensors")
    assert torch.equal(head_cache.read_head(file), head)
    damage(file)
    with pytest.raises(head_cache.DamagedHead):
        head_cache.read_head(file)
    with caplog.at_level("WARNING"):
        again = head_cache.cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, tmp_path)
    assert torch.equal(again, head)
    assert f"the cached zero-shot head {file}" in caplog.text and "computing it again" in caplog.text
    assert torch.equal(head_cache.read_head(file), head)  # rewritten, with its checksum
    assert [p.name for p in tmp_path.iterdir()] == [file.name]  # no temporary file left


@pytest.mark.parametrize("obstacle", ["permission", "file in the way"])
def test_a_head_cache_that_cannot_be_written_is_skipped_with_one_warning(
        tmp_path: Path, head_inputs, obstacle: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import errno

    from clmerge.benchmarks.head import benchmark_head
    from clmerge.evaluation import head_cache

    loaded, benchmark, cpu = head_inputs
    root = tmp_path / "store" / "heads"
    if obstacle == "permission":  # what a read-only store gives (root ignores permission bits)
        real_mkdir = Path.mkdir

        def mkdir(self: Path, *args, **kwargs) -> None:
            if self == root:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        (tmp_path / "store").mkdir()
    else:
        (tmp_path / "store").write_text("a file where the store folder should be")
    with caplog.at_level("WARNING"):
        first = head_cache.cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, root)
        second = head_cache.cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, root)
    assert torch.equal(first, benchmark_head(loaded.model, loaded.tokenizer, benchmark, cpu))
    assert torch.equal(second, first) and not root.exists()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    reason = "Permission denied" if obstacle == "permission" else "Not a directory"
    assert len(warnings) == 1 and warnings[0].startswith("zero-shot heads are not cached, but computed when needed: "
                                                         f"cannot create {root}: {reason}")


@pytest.mark.parametrize("entry, message", [
    ("world/nowhere", "names no world domain"), ("cifar100/sketch", "only world/<domain> takes a domain"),
    ("no_such_dataset", "no_such_dataset")])
def test_bad_control_sets_are_one_line_errors(entry: str, message: str) -> None:
    cfg = BenchmarkConfig(name="b", setting="class_incremental", dataset="world", templates="world",
                          control=[entry])
    with pytest.raises(UserError, match=message):
        controls(cfg, None, 0)


def test_a_world_control_set_is_one_task_of_every_class_in_its_domain() -> None:
    cfg = BenchmarkConfig(name="b", setting="domain_incremental", dataset="world", templates="world",
                          domains=["outline", "noise"], num_tasks=2, control=["world/swirl"])
    (control,) = controls(cfg, None, 3)
    assert control.config.world.domain == "swirl" and control.config.setting == "class_incremental"
    assert len(control.benchmark.tasks) == 1 and control.benchmark.tasks[0].classes == tuple(range(20))
    assert control.seed != controls(cfg, None, 4)[0].seed
