"""Check the built-in world's four required phenomena from `clmerge run` results (one file per seed).

Usage: python scripts/world_properties.py RESULTS.json [RESULTS.json ...]
  (a) zero-shot final accuracy, all-class head, >= 2x chance
  (b) each task: seq-FT accuracy right after training it, with the head it was trained with
      (class-incremental: the task's own classes; domain-incremental: all classes), >= zero-shot + 20 points
  (c) task 1: seq-FT accuracy right after task 1 minus after the last task >= 15 points (protocol of (b);
      the all-class figure is printed too)
  (d) MagMax final accuracy (all-class, mean over tasks) above zero-shot and above seq-FT
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def properties(results: dict) -> dict[str, float]:
    """The measured quantities behind (a)-(d) for one run."""
    methods = results["methods"]
    aware = results["benchmark"]["setting"] == "class_incremental"
    matrix = "accuracy_matrix_task_aware" if aware else "accuracy_matrix"
    seq, zero = methods["seq_ft"][matrix], methods["zero_shot"][matrix]
    tasks = len(seq)
    gains = [seq[j][j] - zero[j][j] for j in range(tasks)]
    return {
        "chance": 1 / len(results["benchmark"]["classnames"]),
        "a_zero_shot": methods["zero_shot"]["final_accuracy"],
        "b_min_gain": min(gains),
        "c_task1_drop": seq[0][0] - seq[-1][0],
        "c_task1_drop_all_class": methods["seq_ft"]["accuracy_matrix"][0][0]
        - methods["seq_ft"]["accuracy_matrix"][-1][0],
        "d_magmax": methods["magmax"]["final_accuracy"],
        "d_seq_ft": methods["seq_ft"]["final_accuracy"],
        "d_zero_shot": methods["zero_shot"]["final_accuracy"],
        **{f"b_gain_task{j + 1}": g for j, g in enumerate(gains)},
    }


def verdict(p: dict[str, float]) -> dict[str, bool]:
    """Whether each property holds."""
    return {
        "a": p["a_zero_shot"] >= 2 * p["chance"],
        "b": p["b_min_gain"] >= 0.20,
        "c": p["c_task1_drop"] >= 0.15,
        "d": p["d_magmax"] > p["d_zero_shot"] and p["d_magmax"] > p["d_seq_ft"],
    }


def main(paths: list[str]) -> None:
    """Print each run's figures, the mean over runs, and the verdicts."""
    runs = [properties(json.loads(Path(p).read_text())) for p in paths]
    keys = list(runs[0])
    print("quantity".ljust(24) + "".join(f"run{i + 1:<6}" for i in range(len(runs))) + "mean")
    for key in keys:
        values = [r[key] for r in runs]
        print(key.ljust(24) + "".join(f"{v:<9.3f}" for v in values) + f"{statistics.mean(values):.3f}")
    mean = {key: statistics.mean(r[key] for r in runs) for key in keys}
    mean["b_min_gain"] = min(v for k, v in mean.items() if k.startswith("b_gain_task"))
    print(f"(b) smallest per-task gain of the mean over runs: {mean['b_min_gain']:.3f}")
    print("per run:", [verdict(r) for r in runs])
    print("mean   :", verdict(mean))


if __name__ == "__main__":
    main(sys.argv[1:])
