"""`clmerge report`: collect the results.json of runs and sweeps into one comparison, tables and plots.

With --out, the files are written into a private folder next to (or in) DIR first and moved into DIR only
once all of them are written: a report that fails leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.markup import escape

from clmerge.errors import UserError
from clmerge.reporting.aggregate import METRICS, PROTOCOLS, Group, group_runs
from clmerge.reporting.collect import Collection, collect
from clmerge.reporting.tables import markdown, rich_table, to_csv, to_json

STAGE_PREFIX = ".clmerge-report-"  # the private folder a report is written into before it is moved to --out


def make_report(paths: list[Path], console: Console, out: Optional[Path] = None, metric: str = "final_accuracy",
                protocol: str = "agnostic", plots: bool = False) -> list[Path]:
    """Print the methods x benchmarks table of `metric`; with `out`, write report.{md,csv,json} (and PNG
    plots with `plots`) there. The inputs and `out` are checked before anything is printed (a folder where a
    report file goes is found after the table, before any file moves), and the files are moved into `out`
    only once all of them are written. Returns the files written."""
    _check_options(metric, protocol, out, plots)
    with _staging(out) as stage:
        found = collect(paths)
        groups = group_runs(found.runs)
        curves = _auto_curves(found) if plots else None
        _print_table(console, found, groups, metric, protocol)
        if stage is None or out is None:
            return []
        written = _publish(_write(stage, groups, found, curves), stage, out)
    console.print(f"wrote {', '.join(str(p) for p in written[:3])}" +
                  (f" and {len(written) - 3} plot(s) under {out / 'plots'}" if len(written) > 3 else ""))
    return written


def _check_options(metric: str, protocol: str, out: Optional[Path], plots: bool) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; valid metrics: {', '.join(METRICS)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}'; valid protocols: {', '.join(PROTOCOLS)}")
    if plots and out is None:
        raise UserError("--plots writes PNG files; give the folder with --out DIR")


def _auto_curves(found: Collection) -> list[Any]:
    """The merge.alpha=auto curves to plot, read (and checked) before anything is printed."""
    from clmerge.reporting.plots import auto_curves

    return auto_curves(found)


def _print_table(console: Console, found: Collection, groups: list[Group], metric: str, protocol: str) -> None:
    console.print(rich_table(groups, metric, protocol))
    console.print(f"{len(found.runs)} results.json from {len(groups)} benchmark(s)")
    for path, reason in found.skipped:
        console.print(f"[yellow]skipped {escape(str(path))}: {escape(reason)}[/yellow]")


@contextmanager
def _staging(out: Optional[Path]) -> Iterator[Optional[Path]]:
    """A private folder to write the report into (None without `out`), removed afterwards, failure or not."""
    if out is None:
        yield None
        return
    stage = _stage_folder(out)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _stage_folder(out: Path) -> Path:
    """A new folder in the nearest existing folder of `out` (so on its file system, and moving files from it
    is a rename); an `out` that is a file, lies below a file or cannot be written to is a one-line UserError."""
    try:
        base = next(path for path in (out, *out.parents) if path.exists())
        if not base.is_dir():
            where = "is a file" if base == out else f"lies below {base}, which is a file"
            raise UserError(f"--out {out} {where}; give a folder (it is created when missing)")
        return Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=base))
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror or err}); give a folder you can write to") \
            from None


def _write(stage: Path, groups: list[Group], found: Collection, curves: Optional[list[Any]]) -> list[Path]:
    """report.{md,csv,json} and, with `curves` (with --plots), the plots under `stage`; returns the files."""
    texts = {"report.md": markdown(groups, found.skipped), "report.csv": to_csv(groups),
             "report.json": to_json(groups, found.skipped)}
    for name, text in texts.items():
        (stage / name).write_bytes(text.encode())
    written = [stage / name for name in texts]
    if curves is not None:
        from clmerge.reporting.plots import write_plots

        written += write_plots(groups, curves, stage / "plots")
    return written


def _publish(staged: list[Path], stage: Path, out: Path) -> list[Path]:
    """Move the staged files to the same places under `out` (replacing older ones); returns their new paths.
    A folder where a file goes, or a file where a folder goes, is a one-line UserError before anything moves."""
    targets = [out / path.relative_to(stage) for path in staged]
    for target in targets:
        if target.is_dir():
            raise UserError(f"cannot write {target}: a folder has that name; move it away or give another --out")
        files = [out / p for p in target.relative_to(out).parents if (out / p).exists() and not (out / p).is_dir()]
        if files:
            raise UserError(f"cannot write {target}: {files[0]} is a file; move it away or give another --out")
    for path, target in zip(staged, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return targets
