"""`clmerge store verify`: check every key of a checkpoint store against its manifest.

Each manifest is unsealed and validated (`clmerge.manifest`), each file it records must exist and match its
sha256. Files no manifest records (left by a writer that was killed) are listed but are not damage: no
command ever reads them. A key another process is writing right now is skipped, not judged. Each cached
zero-shot head (`heads/`) must match the checksum stored in it; a head without one (written by an older
clmerge) is listed, not judged: eval recomputes it. A file or key that cannot be read is damage.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass, field
from pathlib import Path

from clmerge.errors import UserError
from clmerge.evaluation.head_cache import DamagedHead, UncheckedHead, read_head
from clmerge.store import load_manifest, sha256_file

_BOOKKEEPING = {"manifest.json", ".lock"}


@dataclass
class Verdict:
    """What `verify_store` found."""

    keys: int = 0
    files: int = 0
    heads: int = 0  # cached zero-shot heads checked
    damaged: list[str] = field(default_factory=list)  # one line per damaged, unreadable or missing file / manifest
    unrecorded: list[str] = field(default_factory=list)  # files no check covers (never used as they are)
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
        try:
            _verify_locked_key(directory, verdict)
        except OSError as exc:
            verdict.damaged.append(f"{exc.filename or directory}: cannot be read ({exc.strerror or exc}); give "
                                   "this user read permission to it")
    _verify_heads(root / "heads", verdict)
    return verdict


def _verify_locked_key(directory: Path, verdict: Verdict) -> None:
    """Check a key under a shared lock on it (none taken where no writer ever made one); skip a busy key."""
    lock = directory / ".lock"
    if not lock.exists():
        _verify_key(directory, verdict)
        return
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            verdict.busy.append(f"{directory}: being written by another clmerge process; skipped")
            return
        try:
            _verify_key(directory, verdict)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _verify_key(directory: Path, verdict: Verdict) -> None:
    manifest_file = directory / "manifest.json"
    recorded: dict[str, dict] = {}
    if manifest_file.exists():  # none yet: a writer stopped before its first record, nothing counts as done
        try:
            recorded = load_manifest(manifest_file)["files"]
        except UserError as err:
            verdict.damaged.append(str(err))
    for name, record in sorted(recorded.items()):
        verdict.files += 1
        problem = _file_problem(directory / name, record["sha256"])
        if problem:
            verdict.damaged.append(problem)
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in recorded and path.name not in _BOOKKEEPING:
            verdict.unrecorded.append(f"{path}: not recorded in the manifest (left by an interrupted write); ignored")


def _file_problem(file: Path, sha256: str) -> str:
    """The damage line of a recorded file, or "" when it is intact."""
    if not file.is_file():
        return f"{file}: missing; delete {file.parent} and rerun the command that wrote it"
    try:
        intact = sha256_file(file) == sha256
    except UserError as err:  # it cannot be read
        return str(err)
    return "" if intact else (f"{file}: does not match its sha256 in the manifest (damaged); "
                              "delete it and rerun the command that wrote it")


def _verify_heads(folder: Path, verdict: Verdict) -> None:
    """Check every cached zero-shot head against the checksum stored in it (eval recomputes a damaged one)."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            read_head(file)
        except UncheckedHead as err:
            verdict.unrecorded.append(f"{file}: cached zero-shot head {err}; not checked, eval computes it again")
            continue
        except DamagedHead as err:
            verdict.damaged.append(f"{file}: cached zero-shot head {err}; eval computes it again (or delete it)")
        verdict.heads += 1
