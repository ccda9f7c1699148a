"""Store integrity: sealed manifests, `clmerge store verify`, full disks, stale temporaries, key paths, pickles."""

from __future__ import annotations

import ast
import json
import resource
import signal
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error
from test_store import make_cfg

from clmerge.errors import UserError
from clmerge.evaluation.head_cache import CHECKSUM, head_sha256
from clmerge.manifest import SEAL
from clmerge.store import BASE_FILE, CheckpointDir, atomic_save_tensors, finetune_dir, key_path, task_file
from clmerge.store_verify import verify_store

SRC = Path(__file__).resolve().parents[1] / "src" / "clmerge"


def small_store(tmp_path: Path) -> CheckpointDir:
    """A finetune key holding theta_0 and two task vectors, written through the store API."""
    store = finetune_dir(make_cfg(tmp_path))
    store.save(BASE_FILE, {"visual.w": torch.randn(64)}, role="theta_0")
    for index in range(2):
        store.save(task_file(index), {"visual.w": torch.randn(64)}, task=f"task{index + 1}")
    return store


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def test_the_manifest_is_sealed_with_its_sha256(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert len(manifest[SEAL]) == 64
    assert CheckpointDir(store.path, {}).has(task_file(1))


@pytest.mark.parametrize("damage", ["flip a digit", "truncate", "edit a hash", "escape the key directory"])
def test_a_damaged_manifest_is_refused_with_its_path(tmp_path: Path, damage: str) -> None:
    store = small_store(tmp_path)
    file = store.path / "manifest.json"
    text = file.read_text()
    if damage == "flip a digit":
        position = text.index('"sha256": "') + len('"sha256": "')
        text = text[:position] + ("0" if text[position] != "0" else "1") + text[position + 1:]
    elif damage == "truncate":
        text = text[:len(text) // 2]
    elif damage == "edit a hash":
        manifest = json.loads(text)
        manifest["files"][task_file(0)]["sha256"] = "0" * 64
        text = json.dumps(manifest)
    else:  # a forged manifest, sealed correctly, naming a file outside its directory
        from clmerge.manifest import sealed_bytes

        manifest = json.loads(text)
        manifest["files"]["../../../etc/passwd.safetensors"] = {"sha256": "0" * 64}
        text = sealed_bytes(manifest).decode()
    file.write_text(text)
    with pytest.raises(UserError) as caught:
        finetune_dir(make_cfg(tmp_path))
    message = str(caught.value)
    assert str(file) in message and "\n" not in message
    assert ("corrupt manifest" in message) or ("invalid manifest" in message and "plain" in message)


def test_verify_finds_every_damaged_file_and_names_it(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    assert verify_store(tmp_path / "store").intact
    flip_byte(store.path / task_file(0), -1)
    (store.path / task_file(1)).write_bytes((store.path / task_file(1)).read_bytes()[:40])  # truncated
    (store.path / ".tmp-task_002.safetensors-99").write_bytes(b"half")  # a killed writer's leftover
    verdict = verify_store(tmp_path / "store")
    assert not verdict.intact and verdict.keys == 1 and verdict.files == 3
    assert [line.split(":")[0] for line in verdict.damaged] == [str(store.path / task_file(i)) for i in (0, 1)]
    assert len(verdict.unrecorded) == 1 and ".tmp-task_002" in verdict.unrecorded[0]


def test_verify_checks_the_cached_heads_and_names_the_damaged_ones(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    small_store(tmp_path)
    heads = tmp_path / "store" / "heads"
    heads.mkdir()
    for name in ("a_intact", "b_flipped", "c_truncated"):
        head = torch.randn(20, 8)
        atomic_save_tensors(heads / f"{name}.safetensors", {"head": head}, metadata={CHECKSUM: head_sha256(head)})
    save_file({"head": torch.randn(20, 8)}, str(heads / "d_old.safetensors"))  # before heads carried a checksum
    assert verify_store(tmp_path / "store").intact
    flip_byte(heads / "b_flipped.safetensors", -1)
    (heads / "c_truncated.safetensors").write_bytes((heads / "c_truncated.safetensors").read_bytes()[:100])
    verdict = verify_store(tmp_path / "store")
    assert verdict.heads == 3 and verdict.files == 3 and not verdict.intact  # the old one is not checked
    assert verdict.damaged == [
        f"{heads / 'b_flipped.safetensors'}: cached zero-shot head does not match its checksum (damaged); "
        "eval computes it again (or delete it)",
        f"{heads / 'c_truncated.safetensors'}: cached zero-shot head cannot be read (Error while deserializing "
        "header: invalid header length); eval computes it again (or delete it)"]
    assert verdict.unrecorded == [f"{heads / 'd_old.safetensors'}: cached zero-shot head has no checksum (written "
                                  "by an older clmerge); not checked, eval computes it again"]


def test_store_verify_command_exit_status(cli, tmp_path: Path) -> None:
    store = small_store(tmp_path)
    intact = cli("store", "verify", str(tmp_path / "store"))
    assert intact.exit_code == 0 and "intact: 1 keys, 3 recorded files" in intact.stdout
    flip_byte(store.path / BASE_FILE, -1)
    damaged = cli("store", "verify", str(tmp_path / "store"))
    assert damaged.exit_code == 1
    assert f"damaged: {store.path / BASE_FILE}: does not match its sha256" in damaged.stdout
    assert damaged.stderr.strip() == (f"error: 1 problems in 1 keys, 3 recorded files, 0 cached heads under "
                                      f"{tmp_path / 'store'}")
    assert_one_line_error(cli("store", "verify", str(tmp_path / "nowhere")), "is not a clmerge store")
    run = tmp_path / "out" / "merge" / "2026-11-22_01-00-00"  # a run's output folder looks like a store's
    (run / ".hydra").mkdir(parents=True)
    (run / "merge.json").write_text("{}")
    assert_one_line_error(cli("store", "verify", str(tmp_path / "out")), "is not a clmerge store", "output folder")


def test_verify_skips_a_key_another_process_is_writing(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    with store.lock():
        verdict = verify_store(tmp_path / "store")
    assert verdict.intact and verdict.files == 0 and "being written" in verdict.busy[0]


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    before = (store.path / "manifest.json").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # a file-size limit stands in for a full disk
    try:
        with pytest.raises(UserError) as caught:
            store.save(task_file(2), {"visual.w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(caught.value).startswith(f"cannot write {store.path / task_file(2)}: File too large;")
    assert sorted(p.name for p in store.path.iterdir()) == sorted(["manifest.json", BASE_FILE,
                                                                  task_file(0), task_file(1)])
    assert (store.path / "manifest.json").read_bytes() == before
    assert verify_store(tmp_path / "store").intact


def test_the_lock_holder_removes_temporaries_of_killed_writers(tmp_path: Path) -> None:
    store = small_store(tmp_path)
    (store.path / ".tmp-task_002.safetensors-4242").write_bytes(b"half-written")
    with store.lock():
        assert not list(store.path.glob(".tmp-*"))


@pytest.mark.parametrize("part", ["..", ".", "", "a/b", "/etc", "a\\b", "x\0y"])
def test_key_paths_never_leave_the_store(tmp_path: Path, part: str) -> None:
    with pytest.raises(UserError, match="not a plain directory name"):
        key_path(tmp_path, "finetune", part)


def test_a_symlinked_key_directory_outside_the_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "store" / "finetune").mkdir(parents=True)
    (tmp_path / "store" / "finetune" / "k").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="leads outside the store"):
        key_path(tmp_path / "store", "finetune", "k")


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls that could unpickle: pickle.load(s), torch.load without weights_only=True, np.load with pickles."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        name = f"{owner}.{node.func.attr}"
        if name in ("pickle.load", "pickle.loads", "torch.jit.load", "dill.load", "joblib.load"):
            found.append(name)
        elif name == "torch.load" and keywords.get("weights_only") != "True":
            found.append(name)
        elif name in ("np.load", "numpy.load") and keywords.get("allow_pickle") not in (None, "False"):
            found.append(name)
    return found


def test_no_module_can_unpickle_except_through_torch_load_weights_only() -> None:
    offenders = {str(path.relative_to(SRC)): calls for path in sorted(SRC.rglob("*.py"))
                 if (calls := _unsafe_loads(ast.parse(path.read_text())))}
    assert offenders == {}


def test_the_only_unpickler_is_the_numpy_array_allowlist_of_dataset_pickles() -> None:
    unpicklers = [f"{path.relative_to(SRC)}:{node.name}" for path in sorted(SRC.rglob("*.py"))
                  for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
                  and any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases)]
    assert unpicklers == ["data/arrays.py:_ArrayUnpickler"]


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned > pwned.txt",)


def test_a_dataset_pickle_that_would_run_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from clmerge.data.arrays import read_cifar_pickle

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").write_bytes(pickle.dumps({"data": _RunsCode()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_cifar_pickle(tmp_path / "train")
    assert not (tmp_path / "pwned.txt").exists()
