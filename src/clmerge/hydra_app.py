"""The only Hydra glue: schemas in the ConfigStore, compose, override validation and the hydra.main runs.

The CLI hands every command here as a list of override strings. `launch` first composes the config of
every job it will run (a multirun is expanded with Hydra's own override parser and basic-sweeper logic),
so that a bad override ends as one `UserError` line before Hydra writes anything; only then does it
forward the arguments to a `hydra.main`-wrapped run function (Hydra issue #2459: the one way in is
`sys.argv`). The run function converts the DictConfig once to the typed dataclass and calls the library.
A `UserError` raised by the library inside a job reaches the caller as a UserError with the same message
(single run and multirun alike; Hydra would print it on many lines and exit with status 1), and the files
Hydra wrote for the failed job are removed.
"""

from __future__ import annotations

import gc
import logging
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import hydra
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, GrammarParseError, InterpolationResolutionError,
                              MissingMandatoryValue, OmegaConfBaseException, ValidationError)
from rich.console import Console

from clmerge.config import Config, PretrainConfig
from clmerge.errors import NotFinetuned, UserError

CONFIG_MODULE = "clmerge.conf"
VERSION_BASE = "1.3"
AnyConfig = Union[Config, PretrainConfig]

# command -> primary config; finetune, merge, eval and run share one config, hence one store key.
PRIMARY_CONFIG = {"finetune": "config", "merge": "config", "eval": "config", "run": "config",
                  "pretrain": "pretrain"}
SCHEMAS = {"config": Config, "pretrain": PretrainConfig}

# Hydra's own command-line flags that pass through, with the values each may take (None: takes none).
_HYDRA_FLAGS: dict[str, Optional[tuple[str, ...]]] = {
    "--multirun": None, "-m": None, "--resolve": None, "--hydra-help": None,
    "--cfg": ("job", "hydra", "all"), "-c": ("job", "hydra", "all"),
    "--info": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
    "--package": (), "-p": (),  # () = any one value
}
_INSPECT_FLAGS = ("--cfg", "-c", "--info", "--hydra-help")  # print something; run no job
_GROUP_LABELS = {"merge": "merge method", "finetune": "fine-tuning recipe", "hydra/launcher": "launcher"}


def register_schemas() -> None:
    """Store the dataclass schemas under `schema/`, never in an option group, so `glob(*)` sweeps skip them."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)


register_schemas()


# ------------------------------------------------------------------------------------------- compose


@contextmanager
def _composer() -> Iterator[None]:
    """Hydra's compose API on the packaged configs (`pkg://clmerge.conf`); re-entrant."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE):
        yield


def compose_config(overrides: list[str], config_name: str = "config") -> AnyConfig:
    """The typed config of `config_name` with `overrides`; a bad override raises a one-line UserError."""
    with _composer():
        return _compose_job(config_name, list(overrides), hydra_overrides=[])[1]


def show_config(overrides: list[str], config_name: str = "config") -> str:
    """The composed config as YAML (what `clmerge config show` prints)."""
    with _composer():
        return OmegaConf.to_yaml(_compose_job(config_name, list(overrides), hydra_overrides=[])[0])


def _compose_job(config_name: str, overrides: list[str], hydra_overrides: list[str]) -> tuple[DictConfig, AnyConfig]:
    """Compose one job (inside `_composer`): its DictConfig without the hydra node, and its typed config."""
    groups = _task_groups()
    parsed = _parse(hydra_overrides + overrides)
    for override in parsed:
        _check_override(override, config_name, groups)
    try:
        cfg = compose(config_name, hydra_overrides + overrides, return_hydra_config=bool(hydra_overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise _composition_error(err, config_name) from None
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = err.full_key or "?"
        raise UserError(f"no value for {key}; set one with the override {key}=VALUE") from None
    except InterpolationResolutionError as err:
        raise _interpolation_error(err, parsed) from None
    return cfg, typed


def _interpolation_error(err: InterpolationResolutionError, parsed: list[Override]) -> UserError:
    """One line naming the override whose ${...} does not resolve."""
    key = err.full_key or "?"
    named = [o.input_line for o in parsed if o.key_or_group == key and o.input_line]
    return UserError(f"cannot resolve the interpolation in {named[-1] if named else key}: {_first_line(err)}; "
                     f"refer to an existing key (e.g. ${{paths.output}}), or write a literal ${{ as \\${{")


def _parse(overrides: list[str]) -> list[Override]:
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    parsed = []
    for text in overrides:
        if text.startswith("-"):
            raise UserError(f"unknown option '{text}'; see the command's --help (overrides are key=value)")
        try:
            parsed.extend(parser.parse_overrides([text]))
        except HydraException as err:
            raise UserError(f"cannot parse the override '{text}': {_first_line(err)}; "
                            "write key=value (see `clmerge config show` for the keys)") from None
    return parsed


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def _group_options(group: str) -> list[str]:
    """Every option of a config group, options of nested groups included (`class_incremental/world`)."""
    loader = GlobalHydra.instance().config_loader()
    names = list(loader.get_group_options(group, results_filter=ObjectType.CONFIG))
    for sub in loader.list_groups(group):
        if not sub.startswith("_"):
            names.extend(f"{sub}/{name}" for name in _group_options(f"{group}/{sub}"))
    return sorted(names)


def _task_groups() -> set[str]:
    """The option groups of the job config (nested ones as `benchmark/class_incremental`)."""
    loader = GlobalHydra.instance().config_loader()
    found: set[str] = set()
    pending = [name for name in loader.list_groups("") if name not in ("hydra", "schema") and name[0] != "_"]
    while pending:
        group = pending.pop()
        found.add(group)
        pending.extend(f"{group}/{sub}" for sub in loader.list_groups(group) if not sub.startswith("_"))
    return found


def _check_override(override: Override, config_name: str, groups: set[str]) -> None:
    """One-line errors for an unknown option of a group and for adding a key the schema does not have."""
    key = override.key_or_group
    is_group = key in groups or (override.is_hydra_override() and "/" in key)
    if is_group and not override.is_delete() and override.value() is not None:
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        valid = _group_options(key)
        for value in values:
            if value not in valid:
                label = _GROUP_LABELS.get(key, key)
                raise UserError(f"unknown {label} '{value}'; valid {label}s: {', '.join(valid)}")
    elif not is_group and not override.is_hydra_override() and (override.is_add() or override.is_force_add()):
        parent, _, _ = key.rpartition(".")
        if not _is_free_form(config_name, parent):
            raise _unknown_key(config_name, key)


def _schema_node(config_name: str, path: str) -> Any:
    schema = OmegaConf.structured(SCHEMAS[config_name])
    return OmegaConf.select(schema, path) if path else schema


def _is_free_form(config_name: str, path: str) -> bool:
    """True where the schema holds a plain dict (e.g. PretrainConfig.mix), which takes new keys."""
    node = _schema_node(config_name, path)
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def _unknown_key(config_name: str, key: str) -> UserError:
    """The one-line error for a key the schema lacks, listing the valid keys where it goes wrong."""
    if key == "hydra" or key.startswith("hydra."):
        return UserError(f"unknown Hydra key '{key}'; see Hydra's keys with `clmerge finetune --cfg hydra`")
    parts = key.split(".")
    depth = 1
    while depth < len(parts) and isinstance(_schema_node(config_name, ".".join(parts[:depth])), DictConfig):
        depth += 1
    parent, wrong = ".".join(parts[:depth - 1]), ".".join(parts[:depth])
    node = _schema_node(config_name, parent)
    if not isinstance(node, DictConfig):
        return UserError(f"unknown config key '{key}': {parent} is a value, not a section")
    where = f"under {parent}" if parent else "at the top level"
    return UserError(f"unknown config key '{wrong}'; valid keys {where}: {', '.join(node.keys())}")


def _composition_error(err: BaseException, config_name: str) -> UserError:
    cause = err.__cause__
    message = _first_line(err)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return _unknown_key(config_name, cause.full_key)
    if isinstance(cause, GrammarParseError):
        override = message.removeprefix("Error merging override ")
        return UserError(f"cannot read the interpolation in {override}: {_first_line(cause)}; "
                         "close it (${key}), or write a literal ${ as \\${")
    if isinstance(cause, ValidationError):
        override = message.removeprefix("Error merging override ")
        return UserError(f"bad value in {override}: {_first_line(cause)}; see `clmerge config show` for the types")
    if message.startswith("Ambiguous value for argument"):
        text = message.split("'", 1)[1].rstrip("'")
        return UserError(f"'{text}' is a sweep: add -m (--multirun) to run one job per value, "
                         "or write [a,b] for a list")
    return UserError(message)


# ------------------------------------------------------------------------------------------- launch


def split_hydra_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Split arguments into Hydra's pass-through flags (with their values) and overrides."""
    flags: list[str] = []
    overrides: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg not in _HYDRA_FLAGS:
            overrides.append(arg)
            continue
        flags.append(arg)
        values = _HYDRA_FLAGS[arg]
        if values is None:
            continue
        takes_any = values == ()
        if rest and (takes_any or rest[0] in values):
            flags.append(rest.pop(0))
        elif arg == "--info":
            flags.append("all")  # Hydra's default; explicit, so that argparse does not take an override for it
        else:
            choices = "one value" if takes_any else " | ".join(values)
            raise UserError(f"{arg} needs a value ({choices})")
    return flags, overrides


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job: one job, or the product of the sweeps as Hydra's basic sweeper makes it."""
    if not multirun:
        return [list(overrides)]
    with _composer():
        task = [o for o in _parse(overrides) if not o.is_hydra_override()]
        return [list(job) for job in BasicSweeper.split_arguments(task, max_batch_size=None)[0]]


def validate(command: str, overrides: list[str], multirun: bool = False) -> list[AnyConfig]:
    """Compose every job `command` would run; returns their typed configs or raises a one-line UserError."""
    config_name = PRIMARY_CONFIG[command]
    with _composer():
        parsed = _parse(overrides)
        hydra_overrides = [text for text, o in zip(overrides, parsed) if o.is_hydra_override()]
        return [_compose_job(config_name, job, hydra_overrides)[1] for job in expand_jobs(overrides, multirun)]


def _preflight(command: str, cfg: AnyConfig) -> None:
    """Library checks that are cheap and need no data, so a job that must fail fails before Hydra writes."""
    if not isinstance(cfg, Config):
        return
    from clmerge.benchmarks import build_benchmark
    from clmerge.checks import check_config
    from clmerge.evaluation.control import controls
    from clmerge.merging.alpha import parse_alpha
    from clmerge.models.loading import meta_model
    from clmerge.models.lora import check_lora
    from clmerge.training.finetune import check_recipe

    check_config(cfg)  # also every merge method named, in every command
    parse_alpha(cfg.merge.alpha)  # a lambda no merge could use is a mistake in any command
    build_benchmark(cfg.benchmark)
    if command in ("eval", "run"):
        controls(cfg.benchmark, None, cfg.seed)
    if command in ("finetune", "run"):
        check_recipe(cfg.finetune)
        if cfg.finetune.adapter == "lora":
            check_lora(cfg.finetune.lora, meta_model(cfg.model))
    _check_merges(command, cfg)


def _check_merges(command: str, cfg: Config) -> None:
    """The merge settings of the merges `command` will run, and merge's --export path."""
    from clmerge.merging.alpha import check_validation_split, parse_alpha
    from clmerge.merging.export import check_export_path
    from clmerge.merging.job import check_merge_settings, check_mergeable
    from clmerge.training.regimes import evaluated_methods

    if command == "merge":
        check_mergeable(cfg)
        if cfg.merge.export:
            check_export_path(Path(cfg.merge.export), Path(cfg.paths.store))
    methods = [cfg.merge.method] if command == "merge" else evaluated_methods(cfg) if command in ("eval", "run") else []
    if command in ("eval", "run") and not methods and not cfg.eval.baselines:
        raise UserError("nothing to evaluate: no merge method to run (eval.methods is empty, or the run is joint) "
                        "and eval.baselines=false; set eval.baselines=true, or name a method, e.g. --methods magmax")
    if methods:
        check_merge_settings(cfg)
    if cfg.merge.method in methods and parse_alpha(cfg.merge.alpha) == "auto":
        check_validation_split(cfg)


def _check_distinct_exports(command: str, configs: list[AnyConfig]) -> None:
    """The jobs of a merge sweep must not export to one path: each would overwrite the one before."""
    if command != "merge":
        return
    seen: dict[Path, int] = {}
    for job, cfg in enumerate(configs):
        export = cfg.merge.export if isinstance(cfg, Config) else None
        if not export:
            continue
        path = Path(export).resolve()
        if path in seen:
            raise UserError(f"jobs {seen[path]} and {job} of the sweep would both write --export {export}, each "
                            "overwriting the one before; name a file per job, e.g. "
                            "'merge.export=${merge.method}.safetensors', or export one job at a time without -m")
        seen[path] = job


def launch(command: str, args: list[str], multirun: bool = False) -> None:
    """Validate `args` (overrides and Hydra flags), then run `command` through hydra.main."""
    flags, overrides = split_hydra_flags(args)
    multirun = multirun or "-m" in flags or "--multirun" in flags
    flags = [flag for flag in flags if flag not in ("-m", "--multirun")]
    inspect = [flag for flag in flags if flag in _INSPECT_FLAGS]
    if multirun and inspect:
        raise UserError(f"{inspect[0]} shows one config and runs nothing; drop -m/--multirun")
    configs = validate(command, overrides, multirun)
    if not inspect:
        for cfg in configs:
            _preflight(command, cfg)
        _check_distinct_exports(command, configs)
    hydra_args = [*flags, *(["--multirun"] if multirun else []), f"hydra.job.name={command}", *overrides]
    try:
        forward_to_hydra(_MAINS[command], hydra_args)
    except _JobFailed as failed:
        _discard_sweep_dir(failed.discard)
        raise UserError(failed.message, failed.exit_code) from None


def forward_to_hydra(main: Callable[[], Any], args: list[str]) -> None:
    """Call a hydra.main-wrapped function with `args` as its command line: the one place sys.argv changes
    (hydra.main reads nothing else; Hydra issue #2459). sys.argv is restored afterwards."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "clmerge", *args]
    try:
        main()
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------- jobs


def _call_library(command: str, cfg: Any, console: Console, output_dir: Path) -> None:
    """The library function behind `command` (imported here: `clmerge --help` needs no torch)."""
    from clmerge import pipeline

    if command == "pretrain":
        from clmerge.training.pretrain import pretrain

        pretrain(cfg, console)
    elif command == "finetune":
        pipeline.finetune(cfg, console, output_dir)
    elif command == "merge":
        pipeline.merge(cfg, console, output_dir=output_dir)
    elif command == "eval":
        pipeline.evaluate(cfg, console, output_dir)
    else:
        pipeline.run(cfg, console, output_dir)


class _JobFailed(BaseException):
    """A UserError raised inside a job, carried to `launch` past Hydra, which catches (and reports) only
    Exception. Picklable, so it also crosses the process boundary of the joblib launcher."""

    def __init__(self, message: str, discard: Optional[tuple[str, str]], exit_code: int) -> None:
        super().__init__(message, discard, exit_code)
        self.message, self.discard, self.exit_code = message, discard, exit_code


def run_job(command: str, dict_cfg: DictConfig) -> None:
    """Body of every hydra.main run function: one job of `command` on the composed config."""
    runtime = HydraConfig.get()
    output_dir = Path(runtime.runtime.output_dir)
    cfg = OmegaConf.to_object(dict_cfg)
    try:
        _call_library(command, cfg, Console(), output_dir)
    except UserError as err:
        keep = _keep_dir(output_dir, cfg)
        _discard_job_dir(output_dir, runtime.output_subdir, keep)
        message = _finetune_first(err, list(runtime.overrides.task)) if isinstance(err, NotFinetuned) else str(err)
        sweep = (str(output_dir.parent), str(keep)) if runtime.mode == RunMode.MULTIRUN else None
        raise _JobFailed(message, sweep, err.exit_code) from None
    finally:
        _free_accelerator_memory()


def _finetune_first(err: NotFinetuned, overrides: list[str]) -> str:
    """NotFinetuned, completed with the `clmerge finetune` command that makes what is missing."""
    ignored = ("merge", "eval", "hydra")  # they do not change the fine-tuning run
    kept = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0].split("/")[0] not in ignored]
    command = " ".join(["clmerge", "finetune", *(shlex.quote(o) for o in kept)])
    return f"nothing is fine-tuned for this config (no finished run at {err.store_path}); run `{command}` first"


def _free_accelerator_memory() -> None:
    """The basic launcher runs a sweep's jobs in one process: let each job give its memory back."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _keep_dir(output_dir: Path, cfg: AnyConfig) -> Path:
    """The directory above a failed job's output that cleaning stops at: the working directory if the output
    is below it, else `paths.output`, else the job directory's parent."""
    output_dir = output_dir.resolve()
    for candidate in (Path.cwd(), Path(cfg.paths.output) if isinstance(cfg, Config) else None):
        if candidate is not None and output_dir.is_relative_to(candidate.resolve()):
            return candidate.resolve()
    return output_dir.parent


def _discard_job_dir(output_dir: Path, subdir: Optional[str], keep: Path) -> None:
    """Remove what Hydra wrote for a failed job (its `.hydra/` and log file) and the directories left empty."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == output_dir.resolve():
            root.removeHandler(handler)
            handler.close()
            Path(handler.baseFilename).unlink(missing_ok=True)
    if subdir:
        shutil.rmtree(output_dir / subdir, ignore_errors=True)
    _remove_empty_dirs(output_dir, keep)


def _discard_sweep_dir(discard: Optional[tuple[str, str]]) -> None:
    """After a failed sweep: remove its directory if it holds nothing but Hydra's multirun.yaml."""
    if discard is None:
        return
    sweep_dir, keep = Path(discard[0]), Path(discard[1])
    if sweep_dir.is_dir() and [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
        (sweep_dir / "multirun.yaml").unlink()
        _remove_empty_dirs(sweep_dir, keep)


def _remove_empty_dirs(path: Path, keep: Path) -> None:
    """Remove `path` and its parents while they are empty, stopping at `keep`."""
    path, keep = path.resolve(), keep.resolve()
    while path != keep and path.is_relative_to(keep) and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def _hydra_main(command: str) -> Callable[[], None]:
    """The hydra.main-wrapped run function of `command`."""

    def task(cfg: DictConfig) -> None:
        run_job(command, cfg)

    main = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=PRIMARY_CONFIG[command],
                      version_base=VERSION_BASE)
    return main(task)


_MAINS: dict[str, Callable[[], None]] = {command: _hydra_main(command) for command in PRIMARY_CONFIG}
