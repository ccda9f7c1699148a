"""Checkpoint store: round trip, hash verification, atomic writes, keys, locks."""

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clmerge.config import BenchmarkConfig, Config, PathsConfig
from clmerge.errors import UserError
from clmerge.hydra_app import compose_config
from clmerge.store import CheckpointDir, finetune_dir, finetune_key, finetune_subset, merge_dir, task_file


def make_cfg(tmp_path: Path, **finetune: object) -> Config:
    cfg = Config(benchmark=BenchmarkConfig(name="cil", setting="class_incremental", dataset="world",
                                           templates="world"),
                 paths=PathsConfig(store=str(tmp_path / "store")))
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **finetune))


def test_round_trip_is_bit_identical_and_recorded_with_its_hash(tmp_path: Path) -> None:
    store = finetune_dir(make_cfg(tmp_path))
    vector = {"visual.a": torch.randn(3, 4), "visual.b": torch.randn(5)}
    store.save(task_file(0), vector, task="task1")
    assert store.has(task_file(0))
    again = CheckpointDir(store.path, {})
    loaded = again.load(task_file(0))
    assert all(torch.equal(loaded[k], vector[k]) for k in vector)
    assert len(again.info(task_file(0))["sha256"]) == 64
    assert not list(store.path.glob(".tmp-*"))


def test_a_flipped_byte_is_detected(tmp_path: Path) -> None:
    store = finetune_dir(make_cfg(tmp_path))
    store.save(task_file(0), {"visual.a": torch.zeros(100)})
    file = store.path / task_file(0)
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    load_file(str(file))  # still parses: only the hash can tell
    with pytest.raises(UserError, match="does not match its sha256"):
        store.load(task_file(0))


def test_a_file_missing_from_the_manifest_does_not_count(tmp_path: Path) -> None:
    store = finetune_dir(make_cfg(tmp_path))
    store.path.mkdir(parents=True)
    (store.path / task_file(0)).write_bytes(b"half-written")
    assert not store.has(task_file(0))


def test_keys_depend_on_weight_relevant_fields_only(tmp_path: Path) -> None:
    base = make_cfg(tmp_path)
    assert finetune_key(base) == finetune_key(make_cfg(tmp_path, num_workers=4))
    assert finetune_key(base) != finetune_key(make_cfg(tmp_path, lr=1e-3))
    assert finetune_key(base) != finetune_key(dataclasses.replace(base, seed=1))
    assert finetune_key(base).startswith("cil-world-tiny-sequential-s0-")
    assert merge_dir(base, "magmax", {}).path.parent.name == finetune_key(base)


def test_held_out_validation_images_change_the_key_only_when_used(tmp_path: Path) -> None:
    base = make_cfg(tmp_path)
    assert "val_fraction" not in finetune_subset(base)["benchmark"]  # stores made before the field keep their keys
    carved = dataclasses.replace(base, benchmark=dataclasses.replace(base.benchmark, val_fraction=0.1))
    assert finetune_subset(carved)["benchmark"]["val_fraction"] == 0.1
    assert finetune_key(carved) != finetune_key(base)  # it trains on fewer images


def test_settings_that_only_evaluation_reads_leave_the_key_alone(tmp_path: Path) -> None:
    base = make_cfg(tmp_path)
    world = base.benchmark.world
    for benchmark in (dataclasses.replace(base.benchmark, world=dataclasses.replace(world, val_per_class=10)),
                      dataclasses.replace(base.benchmark, world=dataclasses.replace(world, test_per_class=7))):
        assert finetune_key(dataclasses.replace(base, benchmark=benchmark)) == finetune_key(base)
    more = dataclasses.replace(base.benchmark,
                               world=dataclasses.replace(world, train_per_class=world.train_per_class + 1))
    assert finetune_key(dataclasses.replace(base, benchmark=more)) != finetune_key(base)


@pytest.mark.parametrize(("overrides", "key"), [
    ([], "world_cil-world-tiny-sequential-s0-b488b0add8"),
    (["benchmark=domain_incremental/world"], "world_dil-world-tiny-sequential-s0-2e035a2264"),
    (["benchmark=class_incremental/cifar100"], "cifar100_cil-world-tiny-sequential-s0-3711d84205"),
    (["benchmark=class_incremental/cifar100", "benchmark.control=[dtd]"],
     "cifar100_cil-world-tiny-sequential-s0-8724287b2b"),
    (["finetune=pam"], "world_cil-world-tiny-pam-s0-769b980225"),
])
def test_keys_of_existing_stores_never_change(overrides: list[str], key: str) -> None:
    assert finetune_key(compose_config(overrides)) == key  # as computed at bf4cc3d: these stores must stay found


def test_a_second_writer_is_stopped_with_a_clear_error_when_it_may_not_wait(tmp_path: Path) -> None:
    store = finetune_dir(make_cfg(tmp_path))
    with store.lock():
        with pytest.raises(UserError, match="another clmerge process"):
            with finetune_dir(make_cfg(tmp_path)).lock(wait=False):
                pass


def test_a_second_writer_waits_and_then_sees_what_the_first_wrote(tmp_path: Path) -> None:
    first, second = finetune_dir(make_cfg(tmp_path)), finetune_dir(make_cfg(tmp_path))
    holding, events = threading.Event(), []

    def writer() -> None:
        with first.lock():
            holding.set()
            time.sleep(0.3)
            first.save(task_file(0), {"visual.a": torch.ones(2)})
            events.append("first done")

    thread = threading.Thread(target=writer)
    thread.start()
    holding.wait()
    with second.lock():
        events.append("second in")
        assert second.has(task_file(0))  # the manifest was re-read after the wait
    thread.join()
    assert events == ["first done", "second in"]


def test_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    store = finetune_dir(make_cfg(tmp_path))
    store.path.mkdir(parents=True)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt manifest"):
        finetune_dir(make_cfg(tmp_path))
