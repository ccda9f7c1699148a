"""Mid-task resume and preemption: step checkpoints of a task in its store key, and SIGTERM.

A step checkpoint (`resume-task_000-step_000040.safetensors`) holds what decides the rest of a task: the
trained parameters, the optimizer's state tensors (AdamW: step, exp_avg, exp_avg_sq per parameter) and
the global CPU and CUDA RNG states, all as safetensors; the step, the last loss and the optimizer's param
groups go to its manifest record as JSON. No pickle. The manifest records it with its sha256 like every
other file, so a half-written or damaged checkpoint is never used (it is reported and discarded, and
the task starts over). Together with `ShuffledBatches` this makes a resumed task compute bit for bit what
an uninterrupted one computes (with `finetune.num_workers=0`; worker processes keep RNG state of their own).

`finetune.checkpoint_every=N` saves one every N steps (0: off); SIGTERM always saves one after the step
in progress and stops with `Preempted`. Step checkpoints of a task are removed once its task vector is
stored.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from clmerge.data.registry import derived_seed
from clmerge.errors import Preempted, UserError
from clmerge.store import CheckpointDir, Tensors, task_file

_log = logging.getLogger(__name__)
ROLE = "step_checkpoint"
_NAME = re.compile(r"resume-task_(\d{3})-step_(\d{6})\.safetensors")


def checkpoint_file(task: int, step: int) -> str:
    """File name of the step checkpoint of task `task` (0-based) after `step` optimizer steps."""
    return f"resume-task_{task:03d}-step_{step:06d}.safetensors"


@dataclass
class StopRequest:
    """Set by SIGTERM; fine-tuning checks it after every optimizer step."""

    signal_name: str = ""

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)


@dataclass(frozen=True)
class Resumed:
    """Where a task (re)starts: the optimizer steps already done and the loss of the last one."""

    step: int = 0
    loss: float = float("nan")


@dataclass
class TaskCheckpoints:
    """Step checkpoints of one task: restore the latest, save every `every` steps and on SIGTERM."""

    store: CheckpointDir
    task: int
    every: int
    stop: StopRequest = field(default_factory=StopRequest)

    def _recorded(self) -> list[tuple[int, str]]:
        found = [(int(m.group(2)), name) for name in self.store.manifest["files"]
                 if (m := _NAME.fullmatch(name)) and int(m.group(1)) == self.task]
        return sorted(found)

    def restore(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, total: int,
                seed: int) -> Resumed:
        """Load the latest step checkpoint of the task into `params`, `optimizer` and the RNGs, if there is one.

        Without one, the global RNG is seeded from `seed`: a task draws the same random numbers (e.g. for
        augmentations) whether its run started with it or was resumed at it.
        """
        recorded = self._recorded()
        if not recorded:
            torch.manual_seed(derived_seed(seed, "rng"))
            return Resumed()
        step, name = recorded[-1]
        try:
            tensors = self.store.load(name)
            record = self.store.info(name)
            _check_fits(tensors, params, record, total)
        except UserError as err:
            _log.warning("not resuming from a step checkpoint: %s; task %d starts over", err, self.task + 1)
            for _, stale in recorded:
                self.store.discard(stale)
            torch.manual_seed(derived_seed(seed, "rng"))
            return Resumed()
        with torch.no_grad():
            for index, param in enumerate(params):
                param.copy_(tensors[f"param.{index}"])
        optimizer.load_state_dict(_optimizer_state(tensors, record["param_groups"]))
        _set_rng(tensors)
        _log.info("task %d resumes after step %d from %s", self.task + 1, step, self.store.path / name)
        return Resumed(step=step, loss=record["loss"])

    def after_step(self, step: int, total: int, loss: float, params: list[torch.nn.Parameter],
                   optimizer: torch.optim.Optimizer) -> None:
        """Save a step checkpoint when one is due or SIGTERM came; after SIGTERM, raise Preempted."""
        if self.stop.requested:
            name = self._save(step, loss, params, optimizer)
            raise Preempted(f"stopped by {self.stop.signal_name} after step {step}/{total} of task {self.task + 1}; "
                            f"saved {self.store.path / name}; rerun the same command to resume")
        if self.every > 0 and step % self.every == 0 and step < total:
            self._save(step, loss, params, optimizer)

    def _save(self, step: int, loss: float, params: list[torch.nn.Parameter],
              optimizer: torch.optim.Optimizer) -> str:
        state = optimizer.state_dict()
        tensors: Tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
        for index, slots in state["state"].items():
            tensors.update({f"optim.{index}.{key}": value for key, value in slots.items()})
        tensors.update(_rng_states())
        name = checkpoint_file(self.task, step)
        older = [stale for _, stale in self._recorded()]
        self.store.save(name, tensors, role=ROLE, task=self.task, step=step, loss=loss,
                        param_groups=state["param_groups"])
        for stale in older:
            self.store.discard(stale)
        return name

    def finished(self) -> None:
        """The task vector is stored: its step checkpoints are no longer needed."""
        for _, name in self._recorded():
            self.store.discard(name)


def _check_fits(tensors: Tensors, params: list[torch.nn.Parameter], record: dict[str, Any], total: int) -> None:
    """A checkpoint of another model or step budget is refused (the store key should prevent it)."""
    shapes = [tuple(tensors[f"param.{i}"].shape) if f"param.{i}" in tensors else None for i in range(len(params))]
    if shapes != [tuple(p.shape) for p in params] or not 0 < record.get("step", 0) <= total:
        raise UserError("it does not fit this model and step budget")


def _optimizer_state(tensors: Tensors, param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    return {"state": state, "param_groups": param_groups}


def _rng_states() -> Tensors:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_rng(tensors: Tensors) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[key] for key in sorted(tensors) if key.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class Resumable:
    """The step checkpoints of a fine-tuning run held under its store lock, and the SIGTERM request."""

    def __init__(self, store: CheckpointDir, stop: StopRequest):
        self.store, self.stop = store, stop

    def task(self, index: int, every: int) -> TaskCheckpoints:
        """The step checkpoints of task `index` (0-based), saved every `every` steps (0: only on SIGTERM)."""
        return TaskCheckpoints(self.store, index, every, self.stop)

    def discard_stale(self) -> None:
        """Drop step checkpoints of tasks whose vector is stored, and unrecorded ones left by a crash."""
        for name in list(self.store.manifest["files"]):
            match = _NAME.fullmatch(name)
            if match and self.store.has(task_file(int(match.group(1)))):
                self.store.discard(name)
        for path in self.store.path.glob("resume-task_*.safetensors"):
            if path.name not in self.store.manifest["files"]:
                path.unlink(missing_ok=True)


@contextmanager
def resumable(store: CheckpointDir) -> Iterator[Resumable]:
    """Step checkpoints of `store` (whose lock the caller holds), with SIGTERM turned into a stop request.

    Outside the main thread (where Python cannot install signal handlers) SIGTERM keeps its default.
    """
    run = Resumable(store, StopRequest())
    run.discard_stale()
    if threading.current_thread() is not threading.main_thread():
        yield run
        return

    def request_stop(signum: int, _frame: Any) -> None:
        run.stop.signal_name = signal.Signals(signum).name

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield run
    finally:
        signal.signal(signal.SIGTERM, previous)
