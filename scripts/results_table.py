"""The tables of docs/results.md from `clmerge report --out DIR` (DIR/report.json).

Usage:
  python scripts/results_table.py DIR/report.json baselines   # per benchmark, one row per method
  python scripts/results_table.py DIR/report.json pam [METRIC] # PAM's comparison: models x (benchmark, adapter)
  python scripts/results_table.py DIR/report.json ablation    # PAM's p ablation, with PAM's diagnostics

Cells are "mean ± std" in % over the seeds that finished, with their number in brackets where it matters.
A row whose config variant differs only in a regularizer's knobs is labelled with them (e.g. EWC's lambda).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

Record = dict[str, Any]
BASELINE_ROWS = ["zero_shot", "seq_ft", "ind_ft", "joint", "ewc", "lwf", "magmax", "average", "ind_ft+magmax",
                 "ind_ft+average", "ewc+magmax", "ewc+average", "lwf+magmax", "lwf+average", "pam", "pam_task",
                 "pam_task+magmax", "pam_task+average"]
BASELINE_COLUMNS = [("final_accuracy", "agnostic", "final"), ("final_accuracy", "aware", "final (task-aware)"),
                    ("average_incremental_accuracy", "agnostic", "AIA"), ("forgetting", "agnostic", "forgetting"),
                    ("own_task_accuracy", "agnostic", "own task"),
                    ("own_task_accuracy", "aware", "own task (task-aware)"),
                    ("zero_shot_retention_final", "agnostic", "ZR")]
PAM_ROWS = [("zero-shot", "zero_shot"), ("seq-FT", "seq_ft"), ("MagMax (seq-FT vectors)", "magmax"),
            ("averaging (seq-FT vectors)", "average"), ("**PAM**", "pam"), ("PAM's task model ψ_t", "pam_task"),
            ("MagMax over PAM's ψ_t", "pam_task+magmax"), ("averaging over PAM's ψ_t", "pam_task+average")]
SHORT = {"world_cil": "CIL", "world_dil": "DIL"}


def settings(variant: str) -> dict[str, str]:
    """The used config keys of a report row's variant ("k=v, k=v"; unused keys, shown as ∅, dropped)."""
    pairs = (item.split("=", 1) for item in variant.split(", ") if "=" in item)
    return {key: value for key, value in pairs if value != "∅"}


def benchmarks(report: dict[str, Any]) -> list[str]:
    """The report's benchmark labels, sorted (world_cil before world_dil)."""
    return sorted(b["label"] for b in report["benchmarks"])


def cell(record: Optional[Record], count: bool = False) -> str:
    if record is None or record["mean"] is None:
        return "–"
    text = f"{100 * record['mean']:.1f}"
    text += f" ± {100 * record['std']:.1f}" if record["std"] is not None else ""
    return text + (f" ({record['n']})" if count else "")


def knob_label(method: str, used: dict[str, str]) -> str:
    """`method`, plus the regularizer knob that tells its rows apart (lambda), if any."""
    knobs = [f"λ {float(value):.3g}".replace("e+0", "e") for key, value in used.items()
             if key.endswith(("ewc.lamb", "lwf.lamb")) and method.split("+")[0] in key]
    return method + (f" ({', '.join(knobs)})" if knobs else "")


def baselines(report: dict[str, Any]) -> None:
    """One table per benchmark: a row per method (and regularizer lambda), the metrics as columns."""
    cells: dict[tuple[str, str], dict[tuple[str, str], Record]] = defaultdict(dict)
    seeds: dict[tuple[str, str], str] = {}
    for record in report["metrics"]:
        label = knob_label(record["method"], settings(record["variant"]))
        if record["method"] == "zero_shot":
            label = "zero_shot"
        key = (record["benchmark"], label)
        slot = (record["metric"], record["protocol"])
        if slot not in cells[key] or record["n"] > cells[key][slot]["n"]:
            cells[key][slot], seeds[key] = record, " ".join(sorted(record["seeds"].split()))
    for benchmark in benchmarks(report):
        print(f"\n### {benchmark}\n")
        print("| method | seeds | " + " | ".join(title for _, _, title in BASELINE_COLUMNS) + " |")
        print("|---|---|" + "---|" * len(BASELINE_COLUMNS))
        labels = sorted((label for b, label in cells if b == benchmark),
                        key=lambda label: (BASELINE_ROWS.index(label.split(" (")[0]), label))
        for label in labels:
            row = cells[benchmark, label]
            values = [cell(row.get((metric, protocol))) for metric, protocol, _ in BASELINE_COLUMNS]
            print(f"| {label} | {seeds[benchmark, label]} | " + " | ".join(values) + " |")


def metric_by(report: dict[str, Any], metric: str, key: str, default: str) -> dict[tuple[str, str, str], Record]:
    """A task-agnostic metric by (benchmark, method, value of config `key` in the row's variant, or `default`
    where the runs do not differ in it)."""
    found = {}
    for record in report["metrics"]:
        if (record["metric"], record["protocol"]) == (metric, "agnostic"):
            value = settings(record["variant"]).get(key, default)
            slot = (record["benchmark"], record["method"], value)
            if slot not in found or record["n"] > found[slot]["n"]:
                found[slot] = record
    return found


def pam(report: dict[str, Any], metric: str = "final_accuracy") -> None:
    """Models x (benchmark, adapter): `metric`, mean ± std (seeds)."""
    found = metric_by(report, metric, "finetune.adapter", "full")
    columns = [(label, adapter) for label in benchmarks(report) for adapter in ("full", "lora")]
    print("| model | " + " | ".join(f"{SHORT.get(b, b)} {'full' if a == 'full' else 'LoRA'}"
                                     for b, a in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for title, method in PAM_ROWS:
        values = [cell(found.get((b, method, adapter)), count=True) for b, adapter in columns]
        print(f"| {title} | " + " | ".join(values) + " |")


def misaligned(paths: list[str]) -> str:
    """Mean misaligned share |C|/|M| before the resets, per task 2..T, over the runs' results.json."""
    shares = defaultdict(list)
    for path in paths:
        for task, record in enumerate(json.loads(Path(path).read_text()).get("training", []), start=1):
            if "pam" in record and record["pam"]["alignments"]:
                shares[task].append(record["pam"]["misaligned_before"])
    return ", ".join(f"{100 * sum(v) / len(v):.1f}" for _, v in sorted(shares.items())) or "–"


def ablation(report: dict[str, Any]) -> None:
    """p x benchmark: PAM's final accuracy, forgetting, ZR and misaligned share (mean over seeds)."""
    by: dict[tuple[str, str, str], Record] = {}
    for record in report["metrics"]:
        p = settings(record["variant"]).get("finetune.pam.p")
        if record["method"] == "pam" and record["protocol"] == "agnostic" and p is not None:
            by[record["benchmark"], p, record["metric"]] = record
    runs = {(b["label"], settings(row["variant"]).get("finetune.pam.p")): [run["path"] for run in row["runs"]]
            for b in report["benchmarks"] for row in b["rows"] if row["method"] == "pam"}
    labels = benchmarks(report)
    metrics = [("final_accuracy", "final"), ("forgetting", "forgetting"), ("zero_shot_retention_final", "ZR")]
    header = [f"{SHORT.get(b, b)} {title}" for b in labels for _, title in metrics]
    header += [f"{SHORT.get(b, b)} misaligned, tasks 2-T" for b in labels]
    print("| p | seeds | " + " | ".join(header) + " |")
    print("|---|---|" + "---|" * len(header))
    for p in sorted({p for _, p, _ in by}, key=float):
        seeds = " ".join(sorted(by.get((labels[0], p, "final_accuracy"), {}).get("seeds", "–").split()))
        values = [cell(by.get((b, p, metric))) for b in labels for metric, _ in metrics]
        values += [misaligned(runs.get((b, p), [])) for b in labels]
        print(f"| {float(p):g} | {seeds} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    table = {"baselines": baselines, "pam": pam, "ablation": ablation}[sys.argv[2]]
    table(json.loads(Path(sys.argv[1]).read_text()), *sys.argv[3:])
