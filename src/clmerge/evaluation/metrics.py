"""Continual-learning metrics as pure functions of the count matrix (SPEC.md section 5).

c[t][j]: correct predictions of the model after step t+1 on task j (0-based lists, T x T);
n[j]: test samples of task j; A[t][j] = c[t][j] / n[j]. SPEC.md's row A[0] (theta_0, zero-shot) is passed
separately as `zero_shot` (a list over tasks). Metrics that need two tasks are None when T = 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

Matrix = Sequence[Sequence[float]]
Row = Sequence[float]


def accuracy_matrix(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> list[list[float]]:
    """A[t][j] = c[t][j] / n[j]."""
    return [[c / n for c, n in zip(row, sizes)] for row in correct]


def final_accuracy(acc: Matrix) -> float:
    """ACC (Last) = (1/T) sum_j A[T][j]: unweighted mean over tasks after the last step."""
    return sum(acc[-1]) / len(acc[-1])


def final_accuracy_weighted(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> float:
    """The reference's headline: sum_j c[T][j] / sum_j n[j] (sample-weighted)."""
    return sum(correct[-1]) / sum(sizes)


def seen_accuracy(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> list[float]:
    """abar_t = sum_{j<=t} c[t][j] / sum_{j<=t} n[j]: accuracy on the tasks seen so far, after each step."""
    return [sum(correct[t][: t + 1]) / sum(sizes[: t + 1]) for t in range(len(correct))]


def average_incremental_accuracy(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> float:
    """AIA = (1/T) sum_t abar_t (see `seen_accuracy`)."""
    seen = seen_accuracy(correct, sizes)
    return sum(seen) / len(seen)


def own_task_accuracy(acc: Matrix) -> float:
    """(1/T) sum_j A[j][j]: each task right after the step that learned it; for independent fine-tuning, the
    per-task upper bound (each task's own model on its own task)."""
    return sum(acc[j][j] for j in range(len(acc))) / len(acc)


def forgetting(acc: Matrix) -> Optional[float]:
    """F = mean_{j<T} ( max_{t in j..T-1} A[t][j] - A[T][j] ); the max runs only from the step j was learned."""
    steps = len(acc)
    if steps < 2:
        return None
    drops = [max(acc[t][j] for t in range(j, steps - 1)) - acc[-1][j] for j in range(steps - 1)]
    return sum(drops) / len(drops)


def backward_transfer(acc: Matrix) -> Optional[float]:
    """BWT = mean_{j<T} (A[T][j] - A[j][j]) (Lopez-Paz and Ranzato 2017)."""
    steps = len(acc)
    if steps < 2:
        return None
    return sum(acc[-1][j] - acc[j][j] for j in range(steps - 1)) / (steps - 1)


def forward_transfer(acc: Matrix, zero_shot: Row) -> Optional[float]:
    """FWT = (1/(T-1)) sum_{j=2..T} (A[j-1][j] - A[0][j]): accuracy on the next task before learning it, minus
    theta_0's zero-shot accuracy on it (the baseline is zero-shot CLIP, not a random model)."""
    steps = len(acc)
    if steps < 2:
        return None
    return sum(acc[j - 1][j] - zero_shot[j] for j in range(1, steps)) / (steps - 1)


def zscl_transfer(acc: Matrix) -> Optional[float]:
    """ZSCL Transfer = (1/(T-1)) sum_{j=2..T} (1/(j-1)) sum_{t<j} A[t][j]: mean accuracy on tasks not yet
    learned (Zheng et al. 2023)."""
    steps = len(acc)
    if steps < 2:
        return None
    return sum(sum(acc[t][j] for t in range(j)) / j for j in range(1, steps)) / (steps - 1)


def zscl_average(acc: Matrix) -> float:
    """ZSCL Avg = (1/T) sum_j (1/T) sum_t A[t][j]: the mean of the whole matrix."""
    return sum(sum(row) for row in acc) / (len(acc) * len(acc[0]))


def future_zero_shot_change(acc: Matrix, zero_shot: Row) -> list[Optional[float]]:
    """FZ_t = mean_{j>t} (A[t][j] - A[0][j]) after each step t; None after the last step (no future task)."""
    steps = len(acc)
    return [sum(acc[t][j] - zero_shot[j] for j in range(t + 1, steps)) / (steps - 1 - t) if t < steps - 1 else None
            for t in range(steps)]


def zero_shot_retention(correct: dict[str, list[int]], zero_shot: dict[str, int],
                        sizes: dict[str, int]) -> dict[str, object]:
    """ZR_t = mean_h (acc(model_t, h) - acc(theta_0, h)) over the held-out control sets h, after each step, its
    ratio form mean_h acc(model_t, h) / acc(theta_0, h), and both after the last step.

    `correct[h][t]`: model_t's correct predictions on control set h; `zero_shot[h]`: theta_0's; `sizes[h]`: its
    test samples. Everything is None without control sets; the ratio is None when theta_0 gets none right.
    """
    if not correct:
        return {"zero_shot_retention": None, "zero_shot_retention_ratio": None,
                "zero_shot_retention_final": None, "zero_shot_retention_ratio_final": None}
    names = list(correct)
    steps = range(len(correct[names[0]]))
    diff = [sum((correct[h][t] - zero_shot[h]) / sizes[h] for h in names) / len(names) for t in steps]
    ratio = None if any(zero_shot[h] == 0 for h in names) else [
        sum(correct[h][t] / zero_shot[h] for h in names) / len(names) for t in steps]
    return {"zero_shot_retention": diff, "zero_shot_retention_ratio": ratio,
            "zero_shot_retention_final": diff[-1], "zero_shot_retention_ratio_final": ratio and ratio[-1]}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summary(correct: Sequence[Sequence[int]], sizes: Sequence[int],
            zero_shot_correct: Optional[Sequence[int]] = None) -> dict[str, object]:
    """Every metric of one method under one protocol; the zero-shot-relative ones need `zero_shot_correct`
    (theta_0's counts on each task) and are None without it."""
    acc = accuracy_matrix(correct, sizes)
    zero_shot = None if zero_shot_correct is None else [c / n for c, n in zip(zero_shot_correct, sizes)]
    fz = None if zero_shot is None else future_zero_shot_change(acc, zero_shot)
    return {
        "final_accuracy": final_accuracy(acc),
        "final_accuracy_weighted": final_accuracy_weighted(correct, sizes),
        "seen_accuracy": seen_accuracy(correct, sizes),
        "average_incremental_accuracy": average_incremental_accuracy(correct, sizes),
        "own_task_accuracy": own_task_accuracy(acc),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
        "forward_transfer": None if zero_shot is None else forward_transfer(acc, zero_shot),
        "zscl_transfer": zscl_transfer(acc),
        "zscl_average": zscl_average(acc),
        "future_zero_shot_change": fz,
        "future_zero_shot_change_mean": None if fz is None else _mean(fz),
    }
