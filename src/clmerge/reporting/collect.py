"""Find the results.json of runs and multirun sweeps below the paths given to `clmerge report`.

A Hydra job folder of `clmerge eval` or `clmerge run` (one with `.hydra/hydra.yaml` naming that job)
that holds no results.json failed or is still running: it is listed as skipped, never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from clmerge.errors import UserError
from clmerge.reporting.schema import Invalid, check_results

RESULTS = "results.json"
EVALUATING_JOBS = ("eval", "run")  # the commands whose jobs write results.json


@dataclass(frozen=True)
class Run:
    """One results.json and where it was found."""

    path: Path
    results: dict[str, Any]


@dataclass
class Collection:
    """The runs found, and the job folders skipped (path, reason)."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    merge_records: list[Path] = field(default_factory=list)  # merge.json files (alpha=auto curves)


def _job_name(job_dir: Path) -> Optional[str]:
    """hydra.job.name recorded in a Hydra job folder, None when unreadable."""
    try:
        hydra = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())
        return hydra["hydra"]["job"]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _overrides(job_dir: Path) -> str:
    try:
        return " ".join(yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, yaml.YAMLError, TypeError):
        return ""


def read_json(path: Path, fix: str) -> Any:
    """The JSON document in `path`; an unreadable or unparsable file is a one-line UserError ending in `fix`."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err}); {fix}") from None


def read_results(path: Path) -> dict[str, Any]:
    """A results.json document, its structure checked: an unreadable, foreign or malformed file is a one-line
    UserError naming the file (it stops the report, whichever other files are fine)."""
    results = read_json(path, "delete or rewrite it")
    if not isinstance(results, dict) or not {"schema_version", "methods", "test_sizes"} <= results.keys():
        raise UserError(f"{path} is not a clmerge results.json (no schema_version, methods or test_sizes); remove it "
                        "from the paths given to `clmerge report`")
    try:
        check_results(results)
    except Invalid as err:
        raise UserError(f"{path}: {err}; rerun `clmerge eval` for that run or remove the file") from None
    return results


def collect(paths: list[Path]) -> Collection:
    """Every results.json at or below `paths` (files or folders, searched recursively), in path order."""
    found = Collection()
    files: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist; give run or sweep folders (or results.json files)")
        if path.is_file():
            files.add(path.resolve())
            continue
        files.update(p.resolve() for p in path.rglob(RESULTS))
        found.merge_records.extend(sorted(path.rglob("merge.json")))
        for hydra_dir in sorted(path.rglob(".hydra")):
            job = hydra_dir.parent
            if not (job / RESULTS).exists() and _job_name(job) in EVALUATING_JOBS:
                found.skipped.append((job, f"no {RESULTS} (failed or unfinished) {_overrides(job)}".rstrip()))
    found.runs = [Run(file, read_results(file)) for file in sorted(files)]
    if not found.runs:
        where = ", ".join(str(p) for p in paths)
        raise UserError(f"no {RESULTS} under {where}; run `clmerge eval` or `clmerge run` first, "
                        "or give the folder they wrote to (paths.output)")
    return found
