"""PNG plots of a report (matplotlib's Agg canvas, no pyplot state): per benchmark, the accuracy matrix of
each method, the accuracy on the tasks seen so far after each step of every method, and accuracy against
lambda where lambda was swept; and each merge.alpha=auto validation curve. Values are means over seeds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clmerge.errors import UserError
from clmerge.manifest import read_manifest
from clmerge.reporting.aggregate import Group, RowKey
from clmerge.reporting.collect import Collection, Run, read_json
from clmerge.reporting.schema import Invalid, check_curve, check_merge_record

DPI = 100
Curve = tuple[str, str, dict[str, Any]]  # (finetune key, merge method, its merge.alpha=auto validation curve)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") or "x"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _mean(rows: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(m[t][j] for m in rows) / len(rows) for j in range(len(rows[0][0]))] for t in range(len(rows[0]))]


def heatmap(group: Group, key: RowKey, path: Path) -> Path:
    """A[t][j] in percent, one cell per (after step t, task j), task names on both axes."""
    matrix = _mean([run.accuracy["agnostic"] for run in group.rows[key]])
    size = max(6.4, 0.55 * len(matrix) + 2.5)
    figure = _figure(size, size * 0.75)
    axes = figure.add_subplot()
    image = axes.imshow([[100 * a for a in row] for row in matrix], vmin=0, vmax=100, cmap="viridis")
    names = group.task_names
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix)), names[:len(matrix)])
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("after learning task")
    if len(matrix) <= 12:
        for t, row in enumerate(matrix):
            for j, value in enumerate(row):
                axes.text(j, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                          color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    axes.set_title(f"{group.label}: {key.label} (n={len(group.rows[key])})", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def step_curves(group: Group, path: Path) -> Path:
    """Accuracy on the tasks seen so far after each step, every method of the benchmark on one figure."""
    figure = _figure(8, 5)
    axes = figure.add_subplot()
    for key, runs in group.rows.items():
        curves = [run.metrics["agnostic"]["seen_accuracy"] for run in runs]
        mean = [100 * sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]
        axes.plot(range(1, len(mean) + 1), mean, marker="o", label=key.label)
    steps = range(1, len(group.task_names) + 1)
    axes.set_xticks(list(steps), [f"{t}: {name}" for t, name in zip(steps, group.task_names)], rotation=30,
                    ha="right")
    axes.set_xlabel("after learning task")
    axes.set_ylabel("accuracy on the tasks seen so far (%)")
    axes.set_title(group.label, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _line(path: Path, title: str, series: dict[str, tuple[list[float], list[float]]], ylabel: str,
          chosen: float | None = None) -> Path:
    figure = _figure(6.4, 4.8)
    axes = figure.add_subplot()
    for label, (alphas, values) in series.items():
        axes.plot(alphas, [100 * v for v in values], marker="o", label=label)
    if chosen is not None:
        axes.axvline(chosen, color="grey", linestyle="--", label=f"chosen λ={chosen:g}")
    axes.set_xlabel("λ (merge.alpha)")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def lambda_series(group: Group) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(method, variant) -> (lambdas, mean final accuracy), where a method has two or more lambdas."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for key in group.rows:
        mean = group.stat(key, "final_accuracy").mean
        if mean is not None:
            series.setdefault((key.method, key.variant), []).append((key.alpha, mean))
    return {name: ([a for a, _ in sorted(points)], [v for _, v in sorted(points)])
            for name, points in series.items() if len(points) > 1}


def _merge_record_curves(path: Path) -> list[Curve]:
    """The merge.alpha=auto choices of one merge.json; a damaged file is a one-line UserError."""
    fix = "rerun `clmerge merge` for that run or remove the file"
    document = read_json(path, fix)
    try:
        check_merge_record(document)
    except Invalid as err:
        raise UserError(f"{path}: {err}; {fix}") from None
    finetune = Path(document["finetune"]).name
    return [(finetune, name, m["alpha_auto"]) for name, m in document["methods"].items() if "alpha_auto" in m]


def _manifest_curve(path: Path) -> Optional[dict[str, Any]]:
    """The merge.alpha=auto curve kept in a merge manifest (None or {} without one); damage is a one-line
    UserError."""
    fix = f"delete {path.parent} and rerun `clmerge merge`"
    try:
        curve = read_manifest(path).get("alpha_auto")
        if curve:
            check_curve(curve, "alpha_auto")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); {fix}") from None
    except Invalid as err:
        raise UserError(f"{path}: {err}; {fix}") from None
    return curve


def _store_curves(run: Run) -> list[Curve]:
    """The merge.alpha=auto choices kept in the merge manifests of a run's store (none without the store)."""
    store = ((run.results.get("config") or {}).get("paths") or {}).get("store")
    keys = run.results.get("store") or {}
    if not store:
        return []
    manifests = {name: Path(store) / "merge" / keys["finetune"] / key / "manifest.json"
                 for name, key in (keys.get("merge") or {}).items()}
    curves = {name: _manifest_curve(path) for name, path in manifests.items() if path.is_file()}
    return [(keys["finetune"], name, curve) for name, curve in curves.items() if curve]


def auto_curves(found: Collection) -> list[Curve]:
    """(finetune key, method, curve) of every merge.alpha=auto choice in merge.json files and in the merge
    manifests of the runs' stores (each once). A damaged file stops the report, as a damaged results.json does."""
    records = [curve for path in found.merge_records for curve in _merge_record_curves(path)]
    records += [curve for run in found.runs for curve in _store_curves(run)]
    unique: dict[tuple[str, str], Curve] = {}
    for finetune, name, curve in records:
        unique.setdefault((finetune, name), (finetune, name, curve))
    return list(unique.values())


def write_plots(groups: list[Group], curves: list[Curve], root: Path) -> list[Path]:
    """Every plot of the report under `root`, with the merge.alpha=auto `curves`; returns the files."""
    written = []
    for group in groups:
        folder = root / _slug(group.label)
        for index, key in enumerate(group.rows):
            name = f"heatmap-{index:02d}-{key.method}-lambda{key.alpha:g}"
            written.append(heatmap(group, key, folder / f"{_slug(name)}.png"))
        written.append(step_curves(group, folder / "accuracy-after-each-step.png"))
        for (method, variant), points in lambda_series(group).items():
            label = method + (f" [{variant}]" if variant else "")
            written.append(_line(folder / f"lambda-{_slug(label)}.png", f"{group.label}: {label}",
                                 {"final accuracy (test)": points}, "final accuracy (%)"))
    for finetune, method, curve in curves:
        written.append(_line(root / "alpha-auto" / f"{_slug(finetune)}-{_slug(method)}.png",
                             f"{method} on {finetune}: merge.alpha=auto",
                             {"validation accuracy": (curve["grid"], curve["accuracy"])},
                             "accuracy on the validation splits (%)", chosen=curve["alpha"]))
    return written
