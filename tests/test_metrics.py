"""Metrics on hand-written count matrices with hand-computed answers."""

import pytest

from clmerge.evaluation import metrics

CORRECT = [[8, 2, 1], [5, 9, 3], [4, 6, 10]]
SIZES = [10, 10, 20]


def test_accuracy_matrix() -> None:
    assert metrics.accuracy_matrix(CORRECT, SIZES) == [[0.8, 0.2, 0.05], [0.5, 0.9, 0.15], [0.4, 0.6, 0.5]]


def test_final_accuracy_unweighted_and_weighted() -> None:
    acc = metrics.accuracy_matrix(CORRECT, SIZES)
    assert metrics.final_accuracy(acc) == pytest.approx((0.4 + 0.6 + 0.5) / 3)
    assert metrics.final_accuracy_weighted(CORRECT, SIZES) == pytest.approx(20 / 40)


def test_average_incremental_accuracy() -> None:
    # abar_1 = 8/10, abar_2 = 14/20, abar_3 = 20/40
    assert metrics.average_incremental_accuracy(CORRECT, SIZES) == pytest.approx((0.8 + 0.7 + 0.5) / 3)


def test_forgetting_takes_the_max_from_the_step_the_task_was_learned() -> None:
    acc = metrics.accuracy_matrix(CORRECT, SIZES)
    # task 1: max(0.8, 0.5) - 0.4 = 0.4; task 2: max(0.9) - 0.6 = 0.3
    assert metrics.forgetting(acc) == pytest.approx(0.35)
    # future-task accuracy before learning (0.2 for task 2 at step 1) never counts
    assert metrics.forgetting([[0.1, 0.9], [0.1, 0.5]]) == pytest.approx(0.0)


def test_backward_transfer() -> None:
    acc = metrics.accuracy_matrix(CORRECT, SIZES)
    assert metrics.backward_transfer(acc) == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)


def test_single_task_metrics_that_need_two_tasks_are_none() -> None:
    summary = metrics.summary([[3]], [4])
    assert summary["final_accuracy"] == 0.75
    assert summary["forgetting"] is None and summary["backward_transfer"] is None
