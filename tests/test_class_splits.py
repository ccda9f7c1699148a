"""Class-incremental splits: every class in exactly one task, integer boundaries, clear errors."""

import json
from importlib import resources

import pytest

from clmerge.benchmarks.class_incremental import check_class_order, split_classes
from clmerge.benchmarks.domain_incremental import domain_incremental_tasks
from clmerge.errors import UserError

REFERENCE = resources.files("clmerge.data") / "reference_lists.json"


@pytest.mark.parametrize("n", [1, 7, 15, 20, 100, 196, 200])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 10, 11, 20, 50])
def test_every_class_lands_in_exactly_one_task(n: int, k: int) -> None:
    if k > n:
        with pytest.raises(UserError, match="exceeds"):
            split_classes(list(range(n)), k)
        return
    order = list(reversed(range(n)))
    groups = split_classes(order, k)
    assert len(groups) == k
    flat = [c for g in groups for c in g]
    assert sorted(flat) == list(range(n))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1
    assert all(list(g) == sorted(g) for g in groups)


def test_n15_k11_keeps_the_last_class() -> None:
    """The reference's float boundary drops class 14 here; integer arithmetic must not."""
    groups = split_classes(list(range(15)), 11)
    assert groups[-1][-1] == 14
    assert sum(len(g) for g in groups) == 15


def test_cars_sizes_match_the_reference_table() -> None:
    assert [len(g) for g in split_classes(list(range(196)), 5)] == [39, 39, 39, 39, 40]
    assert [len(g) for g in split_classes(list(range(196)), 10)] == [19, 20, 19, 20, 20, 19, 20, 19, 20, 20]


def test_cifar100_first_task_follows_the_reference_order() -> None:
    order = json.loads(REFERENCE.read_text())["CIFAR100.default_class_order"]
    assert order[:4] == [70, 89, 11, 13]
    assert split_classes(order, 10)[0] == tuple(sorted(order[:10]))


def test_class_order_must_be_a_permutation() -> None:
    assert check_class_order(None, 4) == [0, 1, 2, 3]
    assert check_class_order([3, 1, 0, 2], 4) == [3, 1, 0, 2]
    with pytest.raises(UserError, match="permutation"):
        check_class_order([0, 1, 1, 2], 4)


def test_domain_tasks_cover_all_classes_in_order() -> None:
    tasks = domain_incremental_tasks(["b", "a"], ["a", "b", "c"], 3, 2)
    assert [t.domain for t in tasks] == ["b", "a"]
    assert all(t.classes == (0, 1, 2) for t in tasks)
    with pytest.raises(UserError, match="unknown domain"):
        domain_incremental_tasks(["z"], ["a"], 3, 1)
    with pytest.raises(UserError, match="num_tasks"):
        domain_incremental_tasks(["a"], ["a"], 3, 2)
