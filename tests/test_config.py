"""Hydra configs: every option composes into the typed schema; bad overrides are one-line UserErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from clmerge.config import Config, FinetuneConfig, PretrainConfig
from clmerge.errors import UserError
from clmerge.hydra_app import compose_config, expand_jobs, show_config, validate
from clmerge.merging.methods import METHODS
from clmerge.store import finetune_key

CONF = Path(__file__).resolve().parents[1] / "conf"
# conf/hydra/ holds Hydra's own groups (launchers: tests/test_sweeps.py), not options of the job config
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "hydra")


def group_options(group: str) -> list[str]:
    """The options of a group as the YAML files on disk name them (independent of Hydra's listing)."""
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


ALL_OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]


def test_the_groups_and_defaults_are_the_documented_ones() -> None:
    assert GROUPS == ["benchmark", "eval", "finetune", "merge", "model", "paths"]
    cfg = compose_config([])
    assert isinstance(cfg, Config)
    assert (cfg.benchmark.name, cfg.model.name, cfg.merge.method) == ("world_cil", "world-tiny", "magmax")
    assert cfg.finetune.steps == 150 and cfg.eval.methods == ["magmax", "average"]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_group_option_composes_into_the_schema(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    assert isinstance(cfg, Config)
    if group == "merge":
        assert cfg.merge.method == option
    if group == "benchmark":
        assert cfg.benchmark.setting == option.split("/")[0]


def test_every_registered_merge_method_is_a_merge_option_with_its_default_lambda() -> None:
    assert group_options("merge") == sorted(METHODS)
    for name, method in METHODS.items():
        assert compose_config([f"merge={name}"]).merge.alpha == method.default_alpha, name


def test_benchmarks_hold_the_placeholder_world_values() -> None:
    cil = compose_config(["benchmark=class_incremental/world"]).benchmark
    assert (cil.dataset, cil.num_tasks, cil.class_order, cil.templates) == ("world", 5, None, "world")
    assert (cil.world.domain, cil.world.train_per_class, cil.world.test_per_class) == ("blur", 200, 50)
    dil = compose_config(["benchmark=domain_incremental/world"]).benchmark
    assert dil.domains == ["outline", "noise", "texture", "pixel"] and dil.num_tasks == 4
    assert (dil.world.train_per_class, dil.world.test_per_class) == (100, 50)


def test_reference_recipe_is_spec_section_3_4() -> None:
    recipe = compose_config(["finetune=reference"]).finetune
    expected = FinetuneConfig(lr=1e-5, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8, batch_size=128, epochs=10,
                              steps=None, warmup_steps=500, grad_clip=1.0, precision="fp32")
    assert recipe == expected


def test_pretrain_config_composes_into_its_schema() -> None:
    cfg = compose_config(["steps=7"], config_name="pretrain")
    assert isinstance(cfg, PretrainConfig) and cfg.steps == 7


def test_all_commands_but_pretrain_agree_on_the_store_key() -> None:
    overrides = ["seed=3", "finetune.steps=20"]
    keys = {finetune_key(validate(command, overrides)[0]) for command in ("finetune", "merge", "eval", "run")}
    assert len(keys) == 1


def test_typed_values_and_nested_overrides() -> None:
    cfg = compose_config(["finetune.lr=3e-4", "benchmark.class_order=[3,1,2]", "merge.alpha=null"])
    assert cfg.finetune.lr == pytest.approx(3e-4) and cfg.benchmark.class_order == [3, 1, 2]
    assert cfg.merge.alpha is None


@pytest.mark.parametrize(("override", "message"), [
    ("finetune.lr=abc", "bad value in finetune.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("seed=1.5", "bad value in seed=1.5"),
    ("eval.methods=3", "bad value in eval.methods=3"),
])
def test_a_value_of_the_wrong_type_is_rejected(override: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        compose_config([override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", ["finetune.lrr=1", "+finetune.lrr=1"])
def test_an_unknown_key_is_rejected_with_the_valid_keys(override: str) -> None:
    with pytest.raises(UserError, match=r"^unknown config key 'finetune.lrr'; valid keys under finetune: regime, adapter, lr,"):
        compose_config([override])


def test_an_unknown_top_level_key_is_rejected() -> None:
    with pytest.raises(UserError, match=r"^unknown config key 'fintune'; valid keys at the top level: benchmark,"):
        compose_config(["fintune.lr=1"])


def test_unknown_group_options_list_the_valid_names() -> None:
    with pytest.raises(UserError) as info:
        compose_config(["merge=magmx"])
    assert str(info.value) == ("unknown merge method 'magmx'; valid merge methods: average, dare, dare_average, "
                               "dare_magmax, dare_ties, last, magmax, pam, random_mix, task_arithmetic, ties")
    with pytest.raises(UserError) as info:
        compose_config(["benchmark=cifar100"])
    assert str(info.value) == (
        "unknown benchmark 'cifar100'; valid benchmarks: class_incremental/cars, class_incremental/cifar100, "
        "class_incremental/cub200, class_incremental/imagenet_r, class_incremental/world, "
        "domain_incremental/domainnet, domain_incremental/imagenet_r, domain_incremental/world, "
        "multi_dataset/eight_datasets")
    with pytest.raises(UserError, match=r"^unknown model 'vit'; valid models: vit_b16, vit_b32, vit_l14, world_tiny$"):
        compose_config(["model=vit"])


def test_a_sweep_without_multirun_says_to_add_m() -> None:
    with pytest.raises(UserError, match=r"^'merge=magmax,average' is a sweep: add -m"):
        compose_config(["merge=magmax,average"])


def test_an_unparsable_override_is_one_line() -> None:
    with pytest.raises(UserError, match=r"^cannot parse the override 'finetune.lr=\['"):
        compose_config(["finetune.lr=["])


def test_a_missing_mandatory_value_names_the_override_to_set() -> None:
    with pytest.raises(UserError, match=r"^no value for benchmark.name; set one with the override benchmark.name="):
        compose_config(["benchmark.name=???"])


def test_multirun_expands_sweeps_like_the_basic_sweeper() -> None:
    jobs = expand_jobs(["merge=magmax,average", "seed=0,1", "finetune.steps=3"], multirun=True)
    assert jobs == [["merge=magmax", "seed=0", "finetune.steps=3"], ["merge=magmax", "seed=1", "finetune.steps=3"],
                    ["merge=average", "seed=0", "finetune.steps=3"], ["merge=average", "seed=1", "finetune.steps=3"]]


def test_glob_sweeps_see_the_options_and_never_the_schemas() -> None:
    jobs = expand_jobs(["merge=glob(*)"], multirun=True)
    names = ("average", "dare", "dare_average", "dare_magmax", "dare_ties", "last", "magmax", "pam", "random_mix",
             "task_arithmetic", "ties")
    assert sorted(jobs) == [[f"merge={name}"] for name in names]


def test_every_job_of_a_sweep_is_validated() -> None:
    with pytest.raises(UserError, match="unknown merge method 'nope'"):
        validate("merge", ["merge=magmax,nope"], multirun=True)
    with pytest.raises(UserError, match="bad value in finetune.steps=x"):
        validate("finetune", ["finetune.steps=1,x"], multirun=True)


def test_hydra_overrides_are_validated_too() -> None:
    with pytest.raises(UserError, match=r"^unknown launcher 'nope'; valid launchers: basic, joblib"):
        validate("run", ["hydra/launcher=nope"])
    assert len(validate("run", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1"], multirun=True)) == 2


def test_show_config_prints_the_composed_yaml() -> None:
    text = show_config(["benchmark=domain_incremental/world", "seed=4"])
    assert "setting: domain_incremental" in text and "seed: 4" in text and "hydra" not in text


@pytest.mark.parametrize(("override", "message"), [
    ("merge.alpha=${nope}", "cannot resolve the interpolation in merge.alpha=${nope}: Interpolation key 'nope' not "
                            "found; refer to an existing key"),
    ("merge.export='${oc.env:CLMERGE_NO_SUCH_VARIABLE}/m.safetensors'",
     "cannot resolve the interpolation in merge.export='${oc.env:CLMERGE_NO_SUCH_VARIABLE}/m.safetensors': "),
    ("seed=${paths.store}", "cannot resolve the interpolation in seed=${paths.store}: "),
    ("merge.alpha='${nope'", "cannot read the interpolation in merge.alpha='${nope'"),
])
def test_an_interpolation_that_does_not_resolve_is_one_line_naming_the_override(override: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        compose_config([override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert str(info.value).endswith("write a literal ${ as \\${")


def test_an_interpolation_that_resolves_is_kept() -> None:
    cfg = compose_config(["paths.output=/runs", "merge.export=${paths.output}/m.safetensors"])
    assert cfg.merge.export == "/runs/m.safetensors"
