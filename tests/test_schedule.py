"""The reference learning-rate schedule: warmup restarts, peak below base for short tasks."""

import math

import pytest

from clmerge.training.schedule import lr_at, peak_lr, warmup_length


def test_warmup_is_linear_from_base_over_w() -> None:
    assert lr_at(0, 1e-5, 500, 790) == pytest.approx(1e-5 / 500)
    assert lr_at(499, 1e-5, 500, 790) == pytest.approx(1e-5)


def test_cosine_after_warmup_reaches_zero_at_the_end() -> None:
    assert lr_at(500, 1.0, 500, 790) == pytest.approx(1.0)
    assert lr_at(645, 1.0, 500, 790) == pytest.approx(0.5 * (1 + math.cos(math.pi * 145 / 290)))


def test_short_tasks_never_leave_warmup() -> None:
    # CIFAR100/20: 200 steps -> peak 4e-6 (SPEC.md 3.4 table)
    assert peak_lr(1e-5, 500, 200) == pytest.approx(4e-6)
    assert max(lr_at(s, 1e-5, 500, 200) for s in range(200)) == pytest.approx(4e-6)
    assert peak_lr(1e-5, 500, 790) == pytest.approx(1e-5)


def test_warmup_ratio_overrides_steps() -> None:
    assert warmup_length(200, 500, None) == 500
    assert warmup_length(200, 500, 0.1) == 20
    assert warmup_length(45, 500, 0.1) == 5
