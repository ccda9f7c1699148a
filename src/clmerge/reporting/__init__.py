"""`clmerge report`: collect the results.json of runs and sweeps into one comparison, tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape

from clmerge.errors import UserError
from clmerge.reporting.aggregate import METRICS, PROTOCOLS, group_runs
from clmerge.reporting.collect import collect
from clmerge.reporting.tables import markdown, rich_table, to_csv, to_json
from clmerge.store import atomic_write_bytes


def make_report(paths: list[Path], console: Console, out: Optional[Path] = None, metric: str = "final_accuracy",
                protocol: str = "agnostic", plots: bool = False) -> list[Path]:
    """Print the methods x benchmarks table of `metric`; with `out`, write report.{md,csv,json} (and PNG
    plots with `plots`) there. Returns the files written."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; valid metrics: {', '.join(METRICS)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}'; valid protocols: {', '.join(PROTOCOLS)}")
    if plots and out is None:
        raise UserError("--plots writes PNG files; give the folder with --out DIR")
    found = collect(paths)
    groups = group_runs(found.runs)
    console.print(rich_table(groups, metric, protocol))
    console.print(f"{len(found.runs)} results.json from {len(groups)} benchmark(s)")
    for path, reason in found.skipped:
        console.print(f"[yellow]skipped {escape(str(path))}: {escape(reason)}[/yellow]")
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.md", markdown(groups, found.skipped)), ("report.csv", to_csv(groups)),
                       ("report.json", to_json(groups, found.skipped))):
        atomic_write_bytes(out / name, text.encode())
        written.append(out / name)
    if plots:
        from clmerge.reporting.plots import write_plots

        written += write_plots(groups, found, out / "plots")
    console.print(f"wrote {', '.join(str(p) for p in written[:3])}" +
                  (f" and {len(written) - 3} plot(s) under {out / 'plots'}" if len(written) > 3 else ""))
    return written
