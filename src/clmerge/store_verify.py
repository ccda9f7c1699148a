"""`clmerge store verify`: check every key of a checkpoint store against its manifest.

Each manifest is unsealed and validated (`clmerge.manifest`), each file it records must exist and match its
sha256. Files no manifest records (left by a writer that was killed) are listed but are not damage: no
command ever reads them. A key another process is writing right now is skipped, not judged.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass, field
from pathlib import Path

from clmerge.errors import UserError
from clmerge.manifest import read_manifest
from clmerge.store import sha256_file

_BOOKKEEPING = {"manifest.json", ".lock"}


@dataclass
class Verdict:
    """What `verify_store` found."""

    keys: int = 0
    files: int = 0
    damaged: list[str] = field(default_factory=list)  # one line per damaged or missing file / manifest
    unrecorded: list[str] = field(default_factory=list)  # files outside any manifest (ignored by clmerge)
    busy: list[str] = field(default_factory=list)  # keys being written by another process

    @property
    def intact(self) -> bool:
        return not self.damaged


def key_dirs(root: Path) -> list[Path]:
    """Every key directory of the store: finetune/<key>/ and merge/<finetune key>/<key>/ holding a manifest
    or the lock its writer takes first (a run's output folder has merge/<date>/<files>, but neither)."""
    found = [*root.glob("finetune/*/"), *root.glob("merge/*/*/")]
    return sorted(d for d in found if (d / "manifest.json").exists() or (d / ".lock").exists())


def verify_store(root: Path) -> Verdict:
    """Check every key directory under `root`; a root that is not a store is a UserError."""
    hint = "pass the paths.store directory of your runs"
    if not (root / "finetune").is_dir() and not (root / "merge").is_dir():
        raise UserError(f"{root} is not a clmerge store (no finetune/ or merge/ inside); {hint}")
    keys = key_dirs(root)
    if not keys and any(root.glob("*/*/")):
        raise UserError(f"{root} is not a clmerge store (no manifest.json or .lock in its folders, as in a run's "
                        f"output folder); {hint}")
    verdict = Verdict()
    for directory in keys:
        verdict.keys += 1
        lock = directory / ".lock"
        if not lock.exists():
            _verify_key(directory, verdict)
            continue
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                verdict.busy.append(f"{directory}: being written by another clmerge process; skipped")
                continue
            try:
                _verify_key(directory, verdict)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return verdict


def _verify_key(directory: Path, verdict: Verdict) -> None:
    manifest_file = directory / "manifest.json"
    recorded: dict[str, dict] = {}
    if manifest_file.exists():  # none yet: a writer stopped before its first record, nothing counts as done
        try:
            recorded = read_manifest(manifest_file)["files"]
        except UserError as err:
            verdict.damaged.append(str(err))
    for name, record in sorted(recorded.items()):
        verdict.files += 1
        file = directory / name
        if not file.is_file():
            verdict.damaged.append(f"{file}: missing; delete {directory} and rerun the command that wrote it")
        elif sha256_file(file) != record["sha256"]:
            verdict.damaged.append(f"{file}: does not match its sha256 in the manifest (damaged); "
                                   "delete it and rerun the command that wrote it")
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in recorded and path.name not in _BOOKKEEPING:
            verdict.unrecorded.append(f"{path}: not recorded in the manifest (left by an interrupted write); ignored")
