"""Continual-learning baselines: EWC's Fisher and penalty, LwF's distillation, joint training, the bounds."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, files_under
from test_cli import assert_one_line_error
from test_pipeline import QUIET, tiny_cfg
from torch.utils.data import DataLoader, TensorDataset

from clmerge import pipeline
from clmerge.config import EwcConfig, FinetuneConfig
from clmerge.evaluation.metrics import own_task_accuracy
from clmerge.store import finetune_dir, finetune_key, task_file
from clmerge.training import finetune as finetune_loop
from clmerge.training.ewc import diagonal_fisher, ewc_penalty, fisher_file, online_fisher
from clmerge.training.lwf import distillation, old_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Angle(torch.nn.Module):
    """encode_image(x) = (cos(a x), sin(a x)): unit features, so the gradient has a closed form."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.visual = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.visual.weight.fill_(a)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        angle = self.visual(x)[:, 0]
        return torch.stack([angle.cos(), angle.sin()], dim=1)


def _hand_fisher(a: float, xs: list[float], ys: list[int], head: list[tuple[float, float]], batch: int,
                 labels: str) -> float:
    """F = sum_b |b| g_b^2 / N, g_b = mean over b of d CE / d a, written out with math (no autograd)."""
    total = 0.0
    for start in range(0, len(xs), batch):
        grads = []
        for x, y in zip(xs[start:start + batch], ys[start:start + batch]):
            u, du = (math.cos(a * x), math.sin(a * x)), (-x * math.sin(a * x), x * math.cos(a * x))
            z = [w[0] * u[0] + w[1] * u[1] for w in head]
            dz = [w[0] * du[0] + w[1] * du[1] for w in head]
            target = max(range(len(z)), key=z.__getitem__) if labels == "argmax" else y
            p = [math.exp(v) / sum(math.exp(o) for o in z) for v in z]
            grads.append(sum((p[c] - (c == target)) * dz[c] for c in range(len(z))))
        total += len(grads) * (sum(grads) / len(grads)) ** 2
    return total / len(xs)


@pytest.mark.parametrize("labels", ["true", "argmax"])
def test_fisher_matches_a_hand_computed_value_on_two_batches(labels: str) -> None:
    xs, ys, head = [0.5, -1.5, 2.0], [0, 2, 1], [(3.0, 0.0), (0.0, 3.0), (-2.0, -2.0)]
    model = Angle(0.7)
    loader = DataLoader(TensorDataset(torch.tensor(xs).unsqueeze(1), torch.tensor(ys)), batch_size=2)  # 2 + 1
    params = dict(model.named_parameters())
    fisher = diagonal_fisher(model, params, torch.tensor(head), torch.arange(3), loader, labels,
                             torch.Generator(), torch.device("cpu"))
    expected = _hand_fisher(0.7, xs, ys, head, 2, labels)
    assert fisher["visual.weight"].item() == pytest.approx(expected, rel=1e-5)
    # gradients accumulated over batches (the reference's bug) or a per-batch mean would differ
    assert expected != pytest.approx(_hand_fisher(0.7, xs, ys, head, 3, labels), rel=1e-3)
    assert model.visual.weight.grad is None


def test_sampled_fisher_labels_are_reproducible_and_differ_from_argmax() -> None:
    xs = torch.linspace(-2, 2, 16).unsqueeze(1)
    loader = DataLoader(TensorDataset(xs, torch.zeros(16, dtype=torch.int64)), batch_size=4)
    model, head = Angle(0.3), torch.tensor([(1.0, 0.0), (0.0, 1.0)])

    def fisher(labels: str, seed: int) -> float:
        return diagonal_fisher(model, dict(model.named_parameters()), head, torch.arange(2), loader, labels,
                               torch.Generator().manual_seed(seed), torch.device("cpu"))["visual.weight"].item()

    assert fisher("sampled", 1) == fisher("sampled", 1)
    assert fisher("sampled", 1) != fisher("argmax", 1)


def test_penalty_is_zero_at_the_anchor_and_half_the_fisher_weighted_square_away() -> None:
    generator = torch.Generator().manual_seed(0)
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=generator))
              for name, shape in (("visual.a", (3, 2)), ("visual.b", (4,)))}
    anchor = {name: p.detach().clone() for name, p in params.items()}
    fisher = {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
    assert ewc_penalty(params, anchor, fisher).item() == 0.0
    shift = {name: torch.randn(p.shape, generator=generator) for name, p in params.items()}
    moved = {name: anchor[name] + shift[name] for name in params}
    expected = 0.5 * sum((fisher[n] * shift[n] ** 2).sum().item() for n in params)
    assert ewc_penalty(params, moved, fisher).item() == pytest.approx(expected, rel=1e-6)


def test_online_fisher_decays_the_earlier_tasks() -> None:
    first, second = {"w": torch.tensor([4.0])}, {"w": torch.tensor([8.0])}
    after_one = online_fisher(None, first, 0.5)
    assert after_one["w"].item() == 2.0  # F starts at 0: 0.5 * 0 + 0.5 * F_1
    assert online_fisher(after_one, second, 0.5)["w"].item() == 5.0  # 0.5 * 2 + 0.5 * 8


def test_distillation_matches_the_formula_and_is_smallest_when_student_equals_teacher() -> None:
    student, teacher = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    q = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    p = [math.exp(0.5) / (math.exp(0.5) + math.exp(1.5)), math.exp(1.5) / (math.exp(0.5) + math.exp(1.5))]
    expected = -sum(qc * math.log((pc + 1e-5 / 2) / (1 + 1e-5)) for qc, pc in zip(q, p))
    assert distillation(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert distillation(teacher, teacher, 2.0) < distillation(student, teacher, 2.0)


def test_old_head_is_the_earlier_tasks_heads_in_class_incremental_and_the_full_head_otherwise() -> None:
    benchmark = pipeline.build_benchmark(tiny_cfg(Path("/unused")).benchmark)
    tasks = benchmark.tasks
    assert old_rows(tasks[2], tasks, benchmark.num_classes, restrict=True) == [*tasks[0].classes, *tasks[1].classes]
    assert old_rows(tasks[1], tasks, 20, restrict=False) == list(range(20))


def _tau(cfg, index: int) -> dict[str, torch.Tensor]:
    return finetune_dir(cfg).load(task_file(index))


def test_lwf_with_lambda_zero_trains_exactly_as_plain_cross_entropy(tmp_path: Path) -> None:
    plain = tiny_cfg(tmp_path)
    lwf = dataclasses.replace(plain, finetune=dataclasses.replace(
        plain.finetune, regularizer="lwf", lwf=dataclasses.replace(plain.finetune.lwf, lamb=0.0)))
    pipeline.finetune(plain, QUIET)
    pipeline.finetune(lwf, QUIET)
    assert finetune_key(plain) != finetune_key(lwf)
    for index in range(3):
        assert all(torch.equal(_tau(plain, index)[k], v) for k, v in _tau(lwf, index).items())
    on = dataclasses.replace(lwf, finetune=dataclasses.replace(lwf.finetune, lwf=FinetuneConfig().lwf))
    pipeline.finetune(on, QUIET)
    assert torch.equal(_tau(on, 0)["visual.proj"], _tau(plain, 0)["visual.proj"])  # no teacher for task 1
    assert not torch.equal(_tau(on, 1)["visual.proj"], _tau(plain, 1)["visual.proj"])


def test_ewc_stores_the_running_fisher_and_resumes_bit_identically(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, regularizer="ewc", ewc=EwcConfig(lamb=1e3))
    path = pipeline.finetune(cfg, QUIET)
    assert "sequential-ewc" in path.name
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert list(files) == ["base.safetensors", fisher_file(0), task_file(0), fisher_file(1), task_file(1),
                           task_file(2)]  # the Fisher before its task vector; none after the last task
    store = finetune_dir(cfg)
    first, second = store.load(fisher_file(0)), store.load(fisher_file(1))
    assert all((v >= 0).all() for v in second.values()) and any((v > 0).any() for v in first.values())
    hashes = {name: record["sha256"] for name, record in files.items()}
    for name in (fisher_file(1), task_file(1), task_file(2)):  # a crash during task 2
        (path / name).unlink()
        del store.manifest["files"][name]
    store.write_manifest()
    pipeline.finetune(cfg, QUIET)
    resumed = json.loads((path / "manifest.json").read_text())["files"]
    assert {name: record["sha256"] for name, record in resumed.items()} == hashes


@pytest.mark.parametrize("regularizer", ["ewc", "lwf"])
def test_regularizers_run_in_the_domain_incremental_setting(tmp_path: Path, regularizer: str) -> None:
    cfg = tiny_cfg(tmp_path, "domain_incremental", regularizer=regularizer)
    methods = pipeline.run(cfg, QUIET, tmp_path / "out")["methods"]
    assert set(methods) == {"zero_shot", regularizer, f"{regularizer}+magmax", f"{regularizer}+average"}
    assert len(methods[regularizer]["correct"]) == 2


def test_regularizer_settings_change_only_their_own_store_keys(tmp_path: Path) -> None:
    plain = tiny_cfg(tmp_path)
    other_ewc = dataclasses.replace(plain, finetune=dataclasses.replace(plain.finetune, ewc=EwcConfig(lamb=5.0)))
    assert finetune_key(other_ewc) == finetune_key(plain)
    ewc = tiny_cfg(tmp_path, regularizer="ewc")
    stronger = tiny_cfg(tmp_path, regularizer="ewc", ewc=EwcConfig(lamb=5.0))
    lwf_changed = dataclasses.replace(ewc, finetune=dataclasses.replace(ewc.finetune, lwf=dataclasses.replace(
        ewc.finetune.lwf, lamb=0.9)))
    assert len({finetune_key(plain), finetune_key(ewc), finetune_key(stronger)}) == 3
    assert finetune_key(lwf_changed) == finetune_key(ewc)


def test_joint_training_sees_every_class_with_the_all_class_head(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def spy(model, params, recipe, dataset, cfg, *args, **kwargs):
        seen.append((recipe, dataset, cfg))
        return finetune_loop.train_task(model, params, recipe, dataset, cfg, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_task", spy)
    cfg = tiny_cfg(tmp_path, regime="joint")
    results = pipeline.run(cfg, QUIET, tmp_path / "out")
    [(recipe, dataset, recipe_cfg)] = seen
    labels = {int(label) for _, label in dataset}
    assert labels == set(range(20)) and len(dataset) == 20 * cfg.benchmark.world.train_per_class
    assert recipe.head.shape[0] == 20 and recipe.label_map.tolist() == list(range(20))
    assert recipe_cfg.steps == 3 * cfg.finetune.steps  # the sequential run's steps over all tasks
    assert set(results["methods"]) == {"zero_shot", "joint"}
    rows = results["methods"]["joint"]["correct"]
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]
    assert json.loads((finetune_dir(cfg).path / "manifest.json").read_text())["files"].keys() == {
        "base.safetensors", task_file(0)}


def test_own_task_accuracy_is_the_mean_of_the_diagonal() -> None:
    assert own_task_accuracy([[0.5, 0.1], [0.2, 0.9]]) == pytest.approx(0.7)


@pytest.mark.parametrize(("option", "name"), [("ewc", "ewc"), ("lwf", "lwf"), ("joint", "joint"),
                                              ("independent", "ind_ft")])
def test_each_baseline_runs_end_to_end_through_the_cli(cli, paths, tmp_path: Path, option: str, name: str) -> None:
    result = cli("run", f"finetune={option}", *TINY, *paths)
    assert result.exit_code == 0, result.output
    [results_file] = (tmp_path / "outputs" / "run").glob("*/results.json")
    methods = json.loads(results_file.read_text())["methods"]
    merged = [] if option == "joint" else [f"{name}+magmax", f"{name}+average"]
    assert sorted(methods) == sorted(["zero_shot", name, *merged])
    assert cli("report", str(tmp_path / "outputs")).exit_code == 0


@pytest.mark.parametrize(("override", "field"), [
    ("finetune.ewc.lamb=-1", "finetune.ewc.lamb"), ("finetune.lwf.lamb=-0.5", "finetune.lwf.lamb"),
    ("finetune.lwf.temperature=-2", "finetune.lwf.temperature"), ("finetune.lwf.temperature=0", "finetune.lwf.temperature"),
])
def test_negative_lambda_or_temperature_is_one_line_exit_2(cli, paths, tmp_path: Path, override: str,
                                                           field: str) -> None:
    assert_one_line_error(cli("run", "finetune=ewc", override, *paths), field)
    assert files_under(tmp_path) == []


def test_merging_a_joint_run_is_one_line_exit_2(cli, paths, tmp_path: Path) -> None:
    assert_one_line_error(cli("merge", "finetune=joint", *paths), "finetune.regime=joint", "nothing to merge")
    assert files_under(tmp_path) == []
