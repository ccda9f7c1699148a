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


ZERO_SHOT = [3, 1, 2]  # theta_0's counts: A[0] = [0.3, 0.1, 0.1]


def test_seen_accuracy_after_each_step() -> None:
    assert metrics.seen_accuracy(CORRECT, SIZES) == pytest.approx([0.8, 0.7, 0.5])


def test_forward_transfer_uses_the_zero_shot_baseline() -> None:
    acc = metrics.accuracy_matrix(CORRECT, SIZES)
    # ((A[1][2] - A[0][2]) + (A[2][3] - A[0][3])) / 2 = ((0.2 - 0.1) + (0.15 - 0.1)) / 2
    assert metrics.forward_transfer(acc, [0.3, 0.1, 0.1]) == pytest.approx(0.075)


def test_zscl_transfer_and_average() -> None:
    acc = metrics.accuracy_matrix(CORRECT, SIZES)
    # task 2: A[1][2] = 0.2; task 3: (A[1][3] + A[2][3]) / 2 = (0.05 + 0.15) / 2 = 0.1
    assert metrics.zscl_transfer(acc) == pytest.approx((0.2 + 0.1) / 2)
    assert metrics.zscl_average(acc) == pytest.approx(4.1 / 9)


def test_future_zero_shot_change_per_step() -> None:
    acc = metrics.accuracy_matrix(CORRECT, SIZES)
    # step 1: mean(0.2 - 0.1, 0.05 - 0.1) = 0.025; step 2: 0.15 - 0.1; step 3: no future task
    assert metrics.future_zero_shot_change(acc, [0.3, 0.1, 0.1]) == pytest.approx([0.025, 0.05, None])


def test_summary_with_the_zero_shot_row() -> None:
    summary = metrics.summary(CORRECT, SIZES, ZERO_SHOT)
    assert summary["forward_transfer"] == pytest.approx(0.075)
    assert summary["future_zero_shot_change_mean"] == pytest.approx(0.0375)
    assert summary["zscl_transfer"] == pytest.approx(0.15)
    without = metrics.summary(CORRECT, SIZES)
    assert without["forward_transfer"] is None and without["future_zero_shot_change"] is None


def test_the_zero_shot_model_transfers_nothing() -> None:
    rows = [ZERO_SHOT] * 3
    summary = metrics.summary(rows, SIZES, ZERO_SHOT)
    assert summary["forward_transfer"] == 0 and summary["future_zero_shot_change_mean"] == 0
    assert summary["forgetting"] == 0 and summary["backward_transfer"] == 0


def test_single_task_transfer_metrics_are_none() -> None:
    summary = metrics.summary([[3]], [4], [1])
    assert summary["forward_transfer"] is None and summary["zscl_transfer"] is None
    assert summary["future_zero_shot_change"] == [None] and summary["future_zero_shot_change_mean"] is None
    assert summary["zscl_average"] == 0.75


def test_zero_shot_retention_over_two_control_sets() -> None:
    # two control sets of 10 and 20 samples; theta_0 gets 5 and 10 right (50 % each)
    correct = {"a": [5, 3, 6], "b": [10, 12, 4]}
    out = metrics.zero_shot_retention(correct, {"a": 5, "b": 10}, {"a": 10, "b": 20})
    # step 1: (0 + 0)/2; step 2: (-0.2 + 0.1)/2; step 3: (0.1 - 0.3)/2
    assert out["zero_shot_retention"] == pytest.approx([0.0, -0.05, -0.1])
    # ratio: step 2: (3/5 + 12/10)/2 = 0.9; step 3: (6/5 + 4/10)/2 = 0.8
    assert out["zero_shot_retention_ratio"] == pytest.approx([1.0, 0.9, 0.8])
    assert out["zero_shot_retention_final"] == pytest.approx(-0.1)
    assert out["zero_shot_retention_ratio_final"] == pytest.approx(0.8)


def test_zero_shot_retention_without_control_sets_or_zero_shot_hits() -> None:
    assert set(metrics.zero_shot_retention({}, {}, {}).values()) == {None}
    out = metrics.zero_shot_retention({"a": [2, 4]}, {"a": 0}, {"a": 10})
    assert out["zero_shot_retention"] == pytest.approx([0.2, 0.4]) and out["zero_shot_retention_ratio"] is None
