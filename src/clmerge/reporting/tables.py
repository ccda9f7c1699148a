"""The comparison as a terminal table (one metric), Markdown (every metric), CSV and JSON (long form).

Cells are percentages "mean ± std (n)" over seeds; the files keep fractions in [0, 1].
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Optional

from rich.table import Table
from rich.text import Text

from clmerge.reporting.aggregate import METRICS, PROTOCOLS, Group, RowKey, Stat

TITLES = {
    "final_accuracy": "final accuracy (mean over tasks)",
    "final_accuracy_weighted": "final accuracy (sample-weighted, the reference's headline)",
    "average_incremental_accuracy": "average incremental accuracy",
    "own_task_accuracy": "accuracy on each task right after learning it (ind_ft: per-task upper bound)",
    "forgetting": "forgetting",
    "backward_transfer": "backward transfer",
    "forward_transfer": "forward transfer (vs zero-shot)",
    "zscl_transfer": "ZSCL Transfer",
    "zscl_average": "ZSCL Avg",
    "future_zero_shot_change_mean": "zero-shot change on future tasks (mean FZ_t)",
    "zero_shot_retention_final": "zero-shot retention on held-out control sets (ZR_T)",
}
PROTOCOL_TITLES = {"agnostic": "task-agnostic", "aware": "task-aware"}


def cell(stat: Stat) -> str:
    """'81.2 ± 0.4 (3)' in percent; '–' without values."""
    if stat.mean is None:
        return "–"
    text = f"{100 * stat.mean + 0.0:.1f}"
    if stat.std is not None:
        text += f" ± {100 * stat.std:.1f}"
    return f"{text} ({stat.n})"


def _row_keys(groups: list[Group]) -> list[RowKey]:
    keys: list[RowKey] = []
    for group in groups:
        keys.extend(key for key in group.rows if key not in keys)
    return keys


def _grid(groups: list[Group], metric: str, protocol: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (method, then one cell per benchmark) of one metric."""
    header = ["method", *(group.label for group in groups)]
    rows = [[key.label, *(cell(group.stat(key, metric, protocol)) if key in group.rows else "" for group in groups)]
            for key in _row_keys(groups)]
    return header, rows


def rich_table(groups: list[Group], metric: str, protocol: str) -> Table:
    """Methods x benchmarks for one metric."""
    header, rows = _grid(groups, metric, protocol)
    table = Table(title=f"{TITLES[metric]}, {PROTOCOL_TITLES[protocol]}",
                  caption="%: mean ± std over seeds (number of seeds)")
    table.add_column(Text(header[0]))
    for name in header[1:]:
        table.add_column(Text(name), justify="right")
    for row in rows:
        table.add_row(*(Text(text) for text in row))  # plain text: "[a=b]" is no markup
    return table


def markdown(groups: list[Group], skipped: list[tuple[Any, str]]) -> str:
    """Every metric under both protocols, one Markdown table each."""
    lines = ["# clmerge report", "", "Percent, mean ± std over seeds (number of seeds).", ""]
    for protocol in PROTOCOLS:
        for metric in METRICS:
            header, rows = _grid(groups, metric, protocol)
            lines += [f"## {TITLES[metric]}, {PROTOCOL_TITLES[protocol]}", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
    if skipped:
        lines += ["## Skipped job folders", ""] + [f"- `{path}`: {reason}" for path, reason in skipped] + [""]
    return "\n".join(lines)


def records(groups: list[Group]) -> list[dict[str, Any]]:
    """One record per benchmark, row, protocol and metric (fractions)."""
    out = []
    for group in groups:
        for key, runs in group.rows.items():
            for protocol in PROTOCOLS:
                for metric in METRICS:
                    stat = group.stat(key, metric, protocol)
                    out.append({"benchmark": group.label, "method": key.method, "alpha": key.alpha,
                                "variant": key.variant, "protocol": protocol, "metric": metric,
                                "mean": stat.mean, "std": stat.std, "n": stat.n,
                                "seeds": " ".join(str(run.seed) for run in runs)})
    return out


def to_csv(groups: list[Group]) -> str:
    buffer = io.StringIO()
    rows = records(groups)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["benchmark"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def to_json(groups: list[Group], skipped: list[tuple[Any, str]]) -> str:
    def runs(group: Group, key: RowKey) -> list[dict[str, Optional[Any]]]:
        return [{"seed": run.seed, "path": str(run.path)} for run in group.rows[key]]

    document = {
        "benchmarks": [{"label": g.label, "config": g.benchmark, "tasks": g.task_names,
                        "rows": [{"method": k.method, "alpha": k.alpha, "variant": k.variant, "runs": runs(g, k)}
                                 for k in g.rows]} for g in groups],
        "metrics": records(groups),
        "skipped": [{"path": str(path), "reason": reason} for path, reason in skipped],
    }
    return json.dumps(document, indent=2)
