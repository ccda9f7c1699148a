"""Evaluation throughput of the built-in world model (world-tiny, 32 px) on this machine.

Prints images/s of `count_correct` (one model, both protocols) over the world's test images
(a) held in memory as model-ready tensors (the world's path) and (b) decoded once into a memory-mapped
uint8 file and normalised per batch (the path of real datasets), the one-off decode time of (b), and
the zero-shot head computed versus read from the on-disk cache.

    .venv/bin/python benchmarks/eval_bench.py --threads 1 --per-class 50 --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms

from clmerge.benchmarks import build_benchmark
from clmerge.config import BenchmarkConfig, ModelConfig
from clmerge.data import world
from clmerge.evaluation.accuracy import count_correct
from clmerge.evaluation.head_cache import cached_head
from clmerge.evaluation.testset import collect_test_set
from clmerge.models.loading import load_model


class Pictures(Dataset):
    """uint8 [N, 3, H, W] images served as PIL images through a transform, like a real dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index].permute(1, 2, 0).numpy())), int(self.labels[index])


def throughput(model: torch.nn.Module, head: torch.Tensor, test, batch_size: int, repeat: int) -> float:
    count_correct(model, head, test, batch_size, torch.device("cpu"))  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        count_correct(model, head, test, batch_size, torch.device("cpu"))
    return repeat * len(test) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=50, help="test images per class (20 classes)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    loaded = load_model(ModelConfig(pretrained="none"), cpu, init_seed=0)
    benchmark = build_benchmark(BenchmarkConfig(name="world", setting="class_incremental", dataset="world",
                                                templates="world", num_tasks=5, class_order=None))
    classes = [task.classes for task in benchmark.tasks]
    rendered = [world.render_split(c, "plain", args.per_class, index, "test") for index, c in enumerate(classes)]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        head = cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, Path(folder))
        computed = time.perf_counter() - start
        start = time.perf_counter()
        cached_head(loaded.model, loaded.tokenizer, benchmark, cpu, Path(folder))
        cached = time.perf_counter() - start
        memory = collect_test_set([TensorDataset(world.to_model_input(x), y) for x, y in rendered], classes,
                                  benchmark.num_classes)
        normalize = transforms.Normalize(world.NORMALIZE_MEAN, world.NORMALIZE_STD)
        start = time.perf_counter()
        mapped = collect_test_set([Pictures(x, y, transforms.ToTensor()) for x, y in rendered], classes,
                                  benchmark.num_classes, cache=Path(folder) / "images.npy", normalize=normalize)
        decode = time.perf_counter() - start
        print(f"world-tiny, {len(memory)} test images (32 px), batch {args.batch_size}, {args.threads} thread(s)")
        print(f"zero-shot head: computed {computed:.3f} s, from the cache {cached:.4f} s")
        print(f"in memory (world path):         {throughput(loaded.model, head, memory, args.batch_size, args.repeat):8.0f} img/s")
        print(f"memory-mapped uint8 (real path): {throughput(loaded.model, head, mapped, args.batch_size, args.repeat):8.0f} img/s"
              f"   (decoded once in {decode:.2f} s)")


if __name__ == "__main__":
    main()
