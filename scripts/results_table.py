"""The baselines table of docs/results.md from `clmerge report --out DIR` (DIR/report.json).

Usage: python scripts/results_table.py DIR/report.json
Rows: methods in a fixed order; columns: per benchmark, final accuracy (task-agnostic and task-aware),
average incremental accuracy, forgetting and own-task accuracy (both protocols); cells "mean ± std" in %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = ["zero_shot", "seq_ft", "ind_ft", "joint", "ewc", "lwf", "magmax", "average", "ind_ft+magmax",
        "ind_ft+average", "ewc+magmax", "ewc+average", "lwf+magmax", "lwf+average"]
COLUMNS = [("final_accuracy", "agnostic", "final"), ("final_accuracy", "aware", "final (task-aware)"),
           ("average_incremental_accuracy", "agnostic", "AIA"), ("forgetting", "agnostic", "forgetting"),
           ("own_task_accuracy", "agnostic", "own task"), ("own_task_accuracy", "aware", "own task (task-aware)")]


def cell(record: dict) -> str:
    if record is None or record["mean"] is None:
        return "–"
    text = f"{100 * record['mean']:.1f}"
    return text + (f" ± {100 * record['std']:.1f}" if record["std"] is not None else "")


def main(path: Path) -> None:
    report = json.loads(path.read_text())
    found = {(r["benchmark"], r["method"], r["protocol"], r["metric"]): r for r in report["metrics"]}
    seeds = {(r["benchmark"], r["method"]): r["seeds"] for r in report["metrics"]}
    for benchmark in [b["label"] for b in report["benchmarks"]]:
        print(f"\n### {benchmark}\n")
        print("| method | seeds | " + " | ".join(title for _, _, title in COLUMNS) + " |")
        print("|---|---|" + "---|" * len(COLUMNS))
        for method in ROWS:
            if (benchmark, method) not in seeds:
                continue
            cells = [cell(found.get((benchmark, method, protocol, metric))) for metric, protocol, _ in COLUMNS]
            print(f"| {method} | {seeds[benchmark, method]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
