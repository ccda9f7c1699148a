"""The shipped benchmark YAMLs reproduce the reference's splits exactly (SPEC.md 4.1-4.3)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from clmerge.benchmarks import build_benchmark
from clmerge.errors import UserError
from clmerge.hydra_app import compose_config

PACKAGED = json.loads((resources.files("clmerge.data") / "reference_lists.json").read_text())
# sha256 of shared/reference/magmax_data_lists.json, the project's copy of the reference's lists
SHARED_SHA256 = "f4d5e43a8fdc3da18c19a6eefff3ce6ba48d2f9bb18fc692c1f746161b6de2ea"
# benchmark YAML -> (reference order key or None for natural, classes, task counts of the reference scripts)
CIL = {"cifar100": ("CIFAR100.default_class_order", 100, (5, 10, 20, 50)),
       "imagenet_r": ("ImageNetR.default_class_order", 200, (5, 10, 20, 50)),
       "cub200": ("CUB200.default_class_order", 200, (5, 10, 20)),
       "cars": (None, 196, (5, 10, 20))}
CASES = [(name, k) for name, (_, _, counts) in CIL.items() for k in counts]


def reference_split(order: list[int], k: int) -> list[list[int]]:
    """The reference's own rule, in floating point as it computes it: sorted(order[int(n/k*i):int(n/k*(i+1))])."""
    n = len(order)
    return [sorted(order[int(n / k * i):int(n / k * (i + 1))]) for i in range(k)]


def test_packaged_lists_are_the_shared_reference_byte_for_byte() -> None:
    data = (resources.files("clmerge.data") / "reference_lists.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHARED_SHA256


@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_class_incremental_yaml_reproduces_the_reference_split(name: str, k: int) -> None:
    key, n, _ = CIL[name]
    cfg = compose_config([f"benchmark=class_incremental/{name}", f"benchmark.num_tasks={k}", "finetune=reference"])
    benchmark = build_benchmark(cfg.benchmark)
    order = PACKAGED[key] if key else list(range(n))
    assert [list(t.classes) for t in benchmark.tasks] == reference_split(order, k)
    flat = [c for t in benchmark.tasks for c in t.classes]
    assert sorted(flat) == list(range(n))  # every class exactly once
    assert list(benchmark.class_order) == order
    assert all(t.epochs == cfg.finetune.epochs == (30 if name in ("cub200", "cars") else 10)
               for t in benchmark.tasks)


def test_uneven_cars_splits_match_the_reference_sizes() -> None:
    sizes = {k: [len(t.classes) for t in build_benchmark(compose_config(
        ["benchmark=class_incremental/cars", f"benchmark.num_tasks={k}"]).benchmark).tasks] for k in (5, 10, 20)}
    assert sizes[5] == [39, 39, 39, 39, 40]
    assert sizes[10] == [19, 20, 19, 20, 20, 19, 20, 19, 20, 20]
    assert set(sizes[20]) == {9, 10} and sum(sizes[20]) == 196
    assert sizes[20] == [len(g) for g in reference_split(list(range(196)), 20)]


@pytest.mark.parametrize(("name", "key", "expected"), [
    ("imagenet_r", "ImageNetR", ["tattoo", "sketch", "graphic", "painting", "art", "origami", "sculpture",
                                 "graffiti", "cartoon", "misc", "toy", "embroidery", "videogame", "sticker",
                                 "deviantart"]),
    ("domainnet", "DomainNet", ["clipart", "sketch", "real", "infograph", "quickdraw", "painting"])])
def test_domain_incremental_yaml_follows_the_reference_domain_order(name: str, key: str, expected: list) -> None:
    benchmark = build_benchmark(compose_config([f"benchmark=domain_incremental/{name}"]).benchmark)
    order = [PACKAGED[f"{key}.DOMAINS"][i] for i in PACKAGED[f"{key}.default_domain_order"]]
    assert [t.domain for t in benchmark.tasks] == order == expected
    assert all(len(t.classes) == benchmark.num_classes for t in benchmark.tasks)


def test_eight_datasets_follow_the_reference_order_and_epochs() -> None:
    cfg = compose_config(["benchmark=multi_dataset/eight_datasets", "finetune=reference"])
    assert cfg.finetune.epochs is None  # each task's own epochs
    benchmark = build_benchmark(cfg.benchmark)
    order = [name.lower() for name in PACKAGED["8datasets.order"]]
    assert [t.dataset for t in benchmark.tasks] == order
    assert [t.epochs for t in benchmark.tasks] == [PACKAGED["8datasets.epochs"][n] for n in PACKAGED["8datasets.order"]]
    blocks = [t.classes for t in benchmark.tasks]
    assert [len(b) for b in blocks] == [196, 10, 10, 10, 45, 397, 47, 43]
    assert [c for b in blocks for c in b] == list(range(758))  # consecutive, disjoint blocks


def test_seeded_orders_are_permutations_drawn_from_the_seed() -> None:
    cfg = compose_config(["benchmark=class_incremental/cifar100", "benchmark.class_order=seeded"]).benchmark
    orders = [build_benchmark(cfg, seed=s).class_order for s in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == list(range(100))
    dil = compose_config(["benchmark=domain_incremental/domainnet", "benchmark.task_order=seeded"]).benchmark
    domains = [t.domain for t in build_benchmark(dil, seed=3).tasks]
    assert sorted(domains) == sorted(PACKAGED["DomainNet.DOMAINS"])


@pytest.mark.parametrize(("override", "message"), [
    ("benchmark.class_order=shuffled", "unknown benchmark.class_order 'shuffled'"),
    ("benchmark.class_order=[0,1]", "permutation of 0..99"),
    ("benchmark.dataset=imagenet", "unknown dataset 'imagenet'"),
    ("benchmark.templates=nope", "unknown template set 'nope'")])
def test_bad_benchmark_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_benchmark(compose_config(["benchmark=class_incremental/cifar100", override]).benchmark)
