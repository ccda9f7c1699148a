"""Continual-learning metrics as pure functions of the count matrix (SPEC.md section 5).

c[t][j]: correct predictions of the model after step t+1 on task j (0-based lists, T x T);
n[j]: test samples of task j; A[t][j] = c[t][j] / n[j]. Metrics that need two tasks are None when T = 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

Matrix = Sequence[Sequence[float]]


def accuracy_matrix(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> list[list[float]]:
    """A[t][j] = c[t][j] / n[j]."""
    return [[c / n for c, n in zip(row, sizes)] for row in correct]


def final_accuracy(acc: Matrix) -> float:
    """ACC (Last) = (1/T) sum_j A[T][j]: unweighted mean over tasks after the last step."""
    return sum(acc[-1]) / len(acc[-1])


def final_accuracy_weighted(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> float:
    """The reference's headline: sum_j c[T][j] / sum_j n[j] (sample-weighted)."""
    return sum(correct[-1]) / sum(sizes)


def average_incremental_accuracy(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> float:
    """AIA = (1/T) sum_t abar_t, with abar_t = sum_{j<=t} c[t][j] / sum_{j<=t} n[j] (seen tasks)."""
    steps = len(correct)
    seen = [sum(correct[t][: t + 1]) / sum(sizes[: t + 1]) for t in range(steps)]
    return sum(seen) / steps


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


def summary(correct: Sequence[Sequence[int]], sizes: Sequence[int]) -> dict[str, Optional[float]]:
    """Every metric of one method under one protocol."""
    acc = accuracy_matrix(correct, sizes)
    return {
        "final_accuracy": final_accuracy(acc),
        "final_accuracy_weighted": final_accuracy_weighted(correct, sizes),
        "average_incremental_accuracy": average_incremental_accuracy(correct, sizes),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
    }
