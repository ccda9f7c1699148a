"""The checkpoint directory: keys, layout, manifests, atomic writes, hash checks and locks.

Layout (DESIGN.md):
    <root>/finetune/<prefix>-<hash>/manifest.json, base.safetensors, task_000.safetensors, ...
    <root>/merge/<finetune-key>/<method>-<hash>/manifest.json, step_001.safetensors, ...
Every file is written to a temporary name, flushed, fsynced and renamed; the manifest is written last,
so a file only counts once the manifest names it with its sha256. A write that fails (disk full, file-size
limit, no permission, a read-only file system) leaves no temporary file and records nothing, and one that the
user can fix is one UserError line, as is a file that cannot be read. Files get the permission bits of an
ordinary new file (the umask), so other users can read a shared store. Key directories never leave the store root.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clmerge import __version__
from clmerge.config import Config, WorldDataConfig
from clmerge.errors import NotFinetuned, UserError
from clmerge.manifest import FILE_NAME, SCHEMA_VERSION, read_manifest, sealed_bytes

_log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]

# Fields that do not change the weights a fine-tuning run produces (beyond rounding, like the device).
_FINETUNE_KEY_IGNORED = {"num_workers", "device", "log", "optimizer_impl", "distributed", "accumulate",
                         "checkpoint_every"}
_REGULARIZER_CONFIGS = ("ewc", "lwf")  # finetune sub-configs, each used only by the regularizer of its name
_WORLD = WorldDataConfig()  # its validation and test images per class enter finetune keys at these defaults
_TMP_PREFIX = ".tmp-"
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ACCESS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)
_IN_THE_WAY_ERRORS = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # a file where a folder must be, or the reverse
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how the safetensors (Rust) writer names the OS error


class NotWritable(UserError, OSError):
    """A folder clmerge must write to refuses it (permissions, a read-only file system): one line naming it.

    Also an OSError, so a best-effort write that tolerates an unwritable store (merge.alpha=auto's curve) goes on.
    """


def config_hash(payload: Any) -> str:
    """Short stable hash of a JSON-serialisable payload."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _unused_parts(cfg: Config) -> set[str]:
    """Sub-configs of finetune that the run does not use (they must not change its key)."""
    unused = set()
    if cfg.finetune.regime != "pam":
        unused.add("pam")
    if cfg.finetune.adapter != "lora":
        unused.add("lora")
    return unused


def finetune_subset(cfg: Config) -> dict[str, Any]:
    """The part of the config that decides the fine-tuned weights; a regularizer, PAM and LoRA and their
    sub-configs, and benchmark.val_fraction, count only when used, so runs without them keep their keys.
    The world's validation and test images per class, which only evaluation reads (the world renders each
    split apart), enter at their defaults: more test images, or validation images for merge.alpha=auto,
    reuse the fine-tuned run, and keys made with the defaults stay the same."""
    regularizer = cfg.finetune.regularizer
    used = {"regularizer", regularizer} if regularizer != "none" else set()
    dropped = _FINETUNE_KEY_IGNORED | _unused_parts(cfg) | ({"regularizer", *_REGULARIZER_CONFIGS} - used)
    finetune = {k: v for k, v in asdict(cfg.finetune).items() if k not in dropped}
    world = replace(cfg.benchmark.world, val_per_class=_WORLD.val_per_class, test_per_class=_WORLD.test_per_class)
    benchmark = asdict(replace(cfg.benchmark, world=world))
    if not benchmark["val_fraction"]:  # held-out validation images change the training set only when used
        del benchmark["val_fraction"]
    return {"benchmark": benchmark, "model": asdict(cfg.model), "finetune": finetune, "seed": cfg.seed}


def finetune_key(cfg: Config) -> str:
    """Readable, unique directory name of a fine-tuning run."""
    regime = cfg.finetune.regime + (f"-{cfg.finetune.regularizer}" if cfg.finetune.regularizer != "none" else "")
    adapter = "-lora" if cfg.finetune.adapter == "lora" else ""
    prefix = _slug(f"{cfg.benchmark.name}-{cfg.model.name}-{regime}{adapter}-s{cfg.seed}")
    return f"{prefix}-{config_hash(finetune_subset(cfg))}"


def merge_key(method: str, params: dict[str, Any]) -> str:
    """Directory name of a merge (the merged vector does not depend on lambda, so lambda is not in it)."""
    return f"{_slug(method)}-{config_hash({'method': method, **params})}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes; a file that cannot be read is one UserError line naming it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as exc:
        raise unreadable(path, exc) from None
    return digest.hexdigest()


def unreadable(path: Path, exc: OSError) -> UserError:
    """The one-line error of a store file that cannot be read (no permission, a folder in its place)."""
    return UserError(f"cannot read {path}: {exc.strerror or exc}; give this user read permission to it, or "
                     "delete it and rerun the command that wrote it")


def load_manifest(file: Path) -> dict[str, Any]:
    """`read_manifest`, with a manifest that cannot be read as one UserError line naming it."""
    try:
        return read_manifest(file)
    except OSError as exc:
        raise unreadable(file, exc) from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")


@contextmanager
def _mapped(path: Path, action: str = "write") -> Iterator[None]:
    """Turn a failure to `action` `path` that the user can fix (full disk, no permission, a read-only file
    system, a file in the way) into one UserError line; any other failure passes through."""
    try:
        yield
    except BaseException as exc:
        error = _write_error(path, action, exc)
        if error is None:
            raise
        raise error from None


def _errno_of(exc: BaseException) -> int | None:
    """The OS error code of a failed write (the safetensors writer reports it in its message only)."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):
        found = _RUST_OS_ERROR.search(str(exc))
        return int(found.group(1)) if found else None
    return None


def _write_error(path: Path, action: str, exc: BaseException) -> UserError | None:
    """The one-line error of failing to `action` `path` with `exc`, or None when the user cannot fix it."""
    code = _errno_of(exc)
    if code is None:
        return None
    failed = getattr(exc, "filename", None)  # the path the OS refused (for `mkdir -p`, maybe a parent of `path`)
    folder = Path(failed).parent if failed else path.parent
    problem = f"cannot {action} {path}: {os.strerror(code)}"
    if code in _DISK_ERRORS:
        return UserError(f"{problem}; free disk space there (or set paths.store / paths.output to a larger disk) "
                         "and rerun: finished work is kept")
    if code in _ACCESS_ERRORS:
        fix = "mount it writable" if code == errno.EROFS else f"give this user write permission to {folder}"
        return NotWritable(f"{problem}; {fix} or set paths.store / paths.output to a writable folder")
    if code in _IN_THE_WAY_ERRORS:
        return UserError(f"{problem} (a file or folder is in the way); move it away (or set paths.store / "
                         "paths.output to another folder) and rerun")
    return None


def make_dir(path: Path) -> None:
    """Create `path` and its parents; one that cannot be created is one UserError line naming it."""
    with _mapped(path, "create"):
        path.mkdir(parents=True, exist_ok=True)


@contextmanager
def _writing(path: Path, tmp: Path) -> Iterator[None]:
    """Remove `tmp` if the write fails; a failure the user can fix (see `_mapped`) becomes one UserError line."""
    with _mapped(path):
        try:
            yield
        except BaseException:
            with suppress(FileNotFoundError):  # never created, or its writer removed it
                tmp.unlink()
            raise


def _new_file_mode(path: Path) -> int:
    """Create `path` empty and return its permission bits: those of any new file there (umask, default ACL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename."""
    tmp = _tmp_path(path)
    with _writing(path, tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save_tensors(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    tmp = _tmp_path(path)
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with _writing(path, tmp):
        mode = _new_file_mode(tmp)
        save_file(contiguous, str(tmp), metadata=metadata)  # through a file of its own, created with mode 0600
        with suppress(OSError):  # a file system without permission bits (FAT) keeps its own
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return digest


class CheckpointDir:
    """One key directory with a manifest naming every finished file and its sha256."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self._header = header
        self.manifest = self._read_manifest()

    @property
    def exists(self) -> bool:
        return (self.path / "manifest.json").exists()

    def _read_manifest(self) -> dict[str, Any]:
        file = self.path / "manifest.json"
        if not file.exists():
            return {"schema_version": SCHEMA_VERSION, "clmerge_version": __version__, **self._header, "files": {}}
        return load_manifest(file)

    def write_manifest(self) -> None:
        """Persist the manifest (sealed with its sha256) atomically."""
        make_dir(self.path)
        atomic_write_bytes(self.path / "manifest.json", sealed_bytes(self.manifest))

    def has(self, name: str) -> bool:
        """Whether `name` is recorded as complete and its file is present."""
        return name in self.manifest["files"] and (self.path / name).exists()

    def save(self, name: str, tensors: Tensors, **info: Any) -> None:
        """Write a tensor file atomically, then record it (with `info`) in the manifest."""
        if not FILE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a plain .safetensors file name")
        make_dir(self.path)
        digest = atomic_save_tensors(self.path / name, tensors)
        self.manifest["files"][name] = {"sha256": digest, **info}
        self.write_manifest()

    def load(self, name: str) -> Tensors:
        """Load a recorded tensor file after checking its sha256."""
        file = self.verified_path(name)
        try:
            return load_file(str(file))
        except OSError as exc:
            raise unreadable(file, exc) from None

    def verified_path(self, name: str) -> Path:
        """The path of a recorded file after checking its sha256, for readers that stream it themselves."""
        if name not in self.manifest["files"]:
            raise UserError(f"{self.path / name} is not recorded in the manifest; rerun the command that writes it")
        file = self.path / name
        if not file.exists():
            raise UserError(f"{file} is missing; rerun the command that writes it")
        if sha256_file(file) != self.manifest["files"][name]["sha256"]:
            raise UserError(f"{file} does not match its sha256 in the manifest (damaged); delete it and rerun")
        return file

    def info(self, name: str) -> dict[str, Any]:
        """The manifest record of a file."""
        return self.manifest["files"][name]

    def discard(self, name: str) -> None:
        """Forget a file: drop its record (manifest first), then the file."""
        if self.manifest["files"].pop(name, None) is not None:
            self.write_manifest()
        (self.path / name).unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of writers that died mid-write (only called while holding the lock)."""
        for tmp in self.path.glob(f"{_TMP_PREFIX}*"):
            with _mapped(tmp, "remove"):
                tmp.unlink(missing_ok=True)

    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """Hold an exclusive lock on this key, then re-read the manifest (another writer may have added files).

        A second writer waits for the first (`wait`), or stops at once with a clear error.
        """
        make_dir(self.path)
        with _mapped(self.path / ".lock"):  # opened to write: a store this user cannot write fails here, early
            handle = open(self.path / ".lock", "w")
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise UserError(f"another clmerge process is writing {self.path}; "
                                    "wait for it to finish") from None
                _log.warning("waiting for another clmerge process writing %s", self.path)
                fcntl.flock(handle, fcntl.LOCK_EX)
            self.manifest = self._read_manifest()
            self._remove_stale_temporaries()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def task_file(index: int) -> str:
    """File name of task `index`'s (0-based) task vector."""
    return f"task_{index:03d}.safetensors"


def lora_file(index: int) -> str:
    """File name of task `index`'s LoRA factors (adapter=lora; the task file holds their dense delta)."""
    return f"lora_{index:03d}.safetensors"


def global_file(index: int) -> str:
    """File name of PAM's global vector phi after task `index` (0-based), in the trained space."""
    return f"global_{index:03d}.safetensors"


def step_file(step: int) -> str:
    """File name of the merged vector after step `step` (1-based)."""
    return f"step_{step:03d}.safetensors"


BASE_FILE = "base.safetensors"
FINAL_FILE = "final.safetensors"  # the merged vector after the last task


def key_path(root: Path | str, *parts: str) -> Path:
    """root/parts..., refused unless every part is one plain name and the result stays below `root`."""
    root = Path(root)
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise UserError(f"store key '{part}' is not a plain directory name; rename what it was built from")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"store key {'/'.join(parts)} leads outside the store {root}; rename what it was built from")
    return path


def finetune_dir(cfg: Config) -> CheckpointDir:
    """The fine-tuning run directory of `cfg`."""
    key = finetune_key(cfg)
    header = {"kind": "finetune", "key": key, "config": finetune_subset(cfg)}
    return CheckpointDir(key_path(cfg.paths.store, "finetune", key), header)


def merge_dir(cfg: Config, method: str, params: dict[str, Any]) -> CheckpointDir:
    """The merge directory of `method` over the fine-tuning run of `cfg`."""
    key = merge_key(method, params)
    header = {"kind": "merge", "key": key, "finetune_key": finetune_key(cfg), "method": method, "params": params}
    return CheckpointDir(key_path(cfg.paths.store, "merge", finetune_key(cfg), key), header)


def stored_vectors(cfg: Config, num_tasks: int) -> int:
    """How many task vectors a finished run of `cfg` holds: one per task, one in all for joint training."""
    return 1 if cfg.finetune.regime == "joint" else num_tasks


def holds_every_vector(store: CheckpointDir, cfg: Config, num_tasks: int) -> bool:
    """Whether a fine-tuning run's store holds theta_0 and every task vector of `cfg`."""
    return all(store.has(name) for name in [BASE_FILE, *map(task_file, range(stored_vectors(cfg, num_tasks)))])


def finished_finetune(cfg: Config, num_tasks: int) -> CheckpointDir:
    """The fine-tuning run of `cfg`, which must hold theta_0 and every task vector; otherwise NotFinetuned."""
    store = finetune_dir(cfg)
    if not holds_every_vector(store, cfg, num_tasks):
        raise NotFinetuned(str(store.path))
    return store
