"""The `clmerge` command line (Typer). Thin: typed options become Hydra overrides, hydra_app does the rest.

Every trailing argument is a Hydra override (`finetune.lr=1e-4`, `merge=magmax,average` with -m);
Hydra's `-m/--multirun`, `--cfg job`, `--info` and `--resolve` pass through. A mistake the user can fix
ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer vendors click
from typer.core import TyperGroup

from clmerge import __version__, hydra_app
from clmerge.errors import UserError


class _OneLineErrors(TyperGroup):
    """Usage mistakes (unknown option, bad option value) as one line on stderr instead of a box."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:
            err.show()
            code = err.exit_code
        except ClickException as err:
            command = err.ctx.command_path if isinstance(err, UsageError) and err.ctx else "clmerge"
            typer.echo(f"error: {err.format_message().rstrip('.')}; see `{command} --help`", err=True)
            code = err.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    name="clmerge",
    help="Continual learning of CLIP models through model merging.\n\n"
         "Fine-tune a CLIP model task after task, merge the task vectors (MagMax, averaging, ...) and evaluate "
         "every merged model after every task on every task. `finetune`, `merge` and `eval` share one "
         "checkpoint store, so you fine-tune once and merge and evaluate as many ways as you like; `run` does "
         "all three. Trailing arguments are Hydra overrides; `clmerge config show` prints the composed config.",
    epilog="Example: clmerge run --benchmark class_incremental/world --methods magmax,average",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Inspect the composed configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Prepare and check real datasets (layouts: docs/benchmarks.md).", no_args_is_help=True)
app.add_typer(data_app, name="data")
store_app = typer.Typer(help="Check the checkpoint store.", no_args_is_help=True)
app.add_typer(store_app, name="store")

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


class ShowConfig(str, Enum):
    """What Hydra's --cfg prints."""

    job = "job"
    hydra = "hydra"
    all = "all"


Overrides = Annotated[Optional[list[str]], typer.Argument(
    metavar="OVERRIDES", show_default=False,
    help="Hydra overrides such as finetune.lr=1e-4 or merge=magmax,average (a sweep, with -m); "
         "Hydra's --info and --resolve pass through too.")]
ShowOverrides = Annotated[Optional[list[str]], typer.Argument(
    metavar="OVERRIDES", show_default=False, help="Hydra overrides such as finetune.lr=1e-4 or merge=average.")]
Benchmark = Annotated[Optional[str], typer.Option(
    "--benchmark", "-b", metavar="NAME", show_default=False,
    help="Benchmark config, e.g. class_incremental/world or domain_incremental/world (= benchmark=NAME).")]
Seed = Annotated[Optional[int], typer.Option("--seed", show_default=False, help="Run seed (= seed=N).")]
Multirun = Annotated[bool, typer.Option(
    "--multirun", "-m", help="Hydra multirun: one job per combination of the comma-separated override values.")]
Cfg = Annotated[Optional[ShowConfig], typer.Option(
    "--cfg", show_default=False, help="Print the composed config (job, hydra or all) instead of running.")]
Methods = Annotated[Optional[str], typer.Option(
    "--methods", metavar="A,B", show_default=False,
    help="Merge methods to evaluate, comma-separated (= eval.methods=[A,B]).")]


def _options(benchmark: Optional[str] = None, seed: Optional[int] = None, **groups: Optional[str]) -> list[str]:
    """Typed options as Hydra overrides, before the user's own so that those come last."""
    pairs = {"benchmark": benchmark, "seed": None if seed is None else str(seed), **groups}
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def _methods_list(methods: Optional[str]) -> Optional[str]:
    if methods is None:
        return None
    names = [name.strip() for name in methods.split(",") if name.strip()]
    return f"[{','.join(names)}]"


def _guard(action: Callable[[], Any]) -> Any:
    """Run `action`; a UserError becomes one line on stderr and its exit status (2; 143 when preempted)."""
    try:
        return action()
    except UserError as err:
        message = " ".join(str(err).splitlines()).strip()  # any line boundary, also one in a user value
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(err.exit_code) from None


def _launch(command: str, options: list[str], overrides: Optional[list[str]], multirun: bool,
            cfg: Optional[ShowConfig]) -> None:
    args = [*(["--cfg", cfg.value] if cfg else []), *options, *(overrides or [])]
    _guard(lambda: hydra_app.launch(command, args, multirun=multirun))


@app.command(context_settings=_PASS_THROUGH)
def finetune(overrides: Overrides = None, benchmark: Benchmark = None, seed: Seed = None,
             multirun: Multirun = False, cfg: Cfg = None) -> None:
    """Fine-tune the model on every task of the benchmark, one task after the other.

    Task vectors go to the checkpoint store (paths.store); finished tasks are skipped on a rerun.

    [bold]Examples[/bold]

      clmerge finetune

      clmerge finetune --benchmark domain_incremental/world finetune.steps=300

      clmerge finetune finetune=reference model.name=ViT-B-16 model.pretrained=/weights/vit_b_16.safetensors

      clmerge finetune -m seed=0,1,2
    """
    _launch("finetune", _options(benchmark, seed), overrides, multirun, cfg)


def _quoted(value: Optional[Path]) -> Optional[str]:
    """A value as a quoted Hydra string that reaches the config literally: paths may hold quotes and backslashes,
    which the override grammar reads, and ${, which OmegaConf would resolve."""
    if value is None:
        return None
    # OmegaConf: \${ is a literal ${, and backslashes before it are doubled
    text = re.sub(r"(\\*)\$\{", lambda m: 2 * m[1] + "\\${", str(value))
    # Hydra: in a quoted string, backslashes before a quote (or before the closing quote) are doubled, \' is a quote
    text = re.sub(r"(\\*)('|\Z)", lambda m: 2 * m[1] + ("\\'" if m[2] else ""), text)
    return f"'{text}'"


@app.command(context_settings=_PASS_THROUGH)
def merge(overrides: Overrides = None,
          method: Annotated[Optional[str], typer.Option(
              "--method", metavar="NAME", show_default=False,
              help="Merge method (= merge=NAME): magmax, average, task_arithmetic, random_mix, ties, dare, "
                   "dare_magmax, dare_average, dare_ties, last or pam; with -m, a,b sweeps.")] = None,
          export: Annotated[Optional[Path], typer.Option(
              "--export", metavar="PATH", show_default=False,
              help="Also write the final merged model as a full open_clip checkpoint (*.safetensors, outside "
                   "paths.store; an existing file there is replaced; load it with "
                   "open_clip.create_model(NAME, pretrained=PATH); for world-tiny, call "
                   "clmerge.models.loading.register_builtin_configs() first).")] = None,
          benchmark: Benchmark = None, seed: Seed = None, multirun: Multirun = False, cfg: Cfg = None) -> None:
    """Merge the fine-tuned task vectors with one merge method.

    Reads the fine-tuning run of the same config from the store, writes the final merged vector (every
    step's too with merge.save_steps=true) and diagnostics next to it, and merge.json to the run directory.
    merge.alpha=auto picks lambda on validation data held out of training (benchmark.val_fraction > 0 on
    real datasets, benchmark.world.val_per_class > 0 on the built-in world).

    [bold]Examples[/bold]

      clmerge merge --method magmax

      clmerge merge --method ties merge.alpha=0.8 merge.ties.scope=tensor

      clmerge merge --method average merge.alpha=auto benchmark.world.val_per_class=10

      clmerge merge --method magmax --export merged.safetensors

      clmerge merge -m --method magmax,average
    """
    _launch("merge", _options(benchmark, seed, merge=method, **{"merge.export": _quoted(export)}), overrides,
            multirun, cfg)


@app.command("eval", context_settings=_PASS_THROUGH)
def evaluate(overrides: Overrides = None, methods: Methods = None, benchmark: Benchmark = None, seed: Seed = None,
             multirun: Multirun = False, cfg: Cfg = None) -> None:
    """Evaluate zero-shot, fine-tuned and merged models after every task on every task.

    Writes results.json (accuracy matrix and metrics per method) to the run directory and prints a table.

    [bold]Examples[/bold]

      clmerge eval

      clmerge eval --methods magmax eval.batch_size=512
    """
    _launch("eval", _options(benchmark, seed, **{"eval.methods": _methods_list(methods)}), overrides, multirun, cfg)


@app.command(context_settings=_PASS_THROUGH)
def run(overrides: Overrides = None, methods: Methods = None, benchmark: Benchmark = None, seed: Seed = None,
        multirun: Multirun = False, cfg: Cfg = None) -> None:
    """Fine-tune, merge with every method and evaluate: the whole experiment in one command.

    [bold]Examples[/bold]

      clmerge run

      clmerge run --benchmark domain_incremental/world --methods magmax,average

      clmerge run -m seed=0,1,2 hydra/launcher=joblib hydra.launcher.n_jobs=3
    """
    _launch("run", _options(benchmark, seed, **{"eval.methods": _methods_list(methods)}), overrides, multirun, cfg)


@app.command(context_settings=_PASS_THROUGH)
def pretrain(overrides: Overrides = None, seed: Seed = None, multirun: Multirun = False, cfg: Cfg = None) -> None:
    """Pretrain the built-in tiny CLIP (world-tiny) contrastively on captions of the synthetic world.

    [bold]Examples[/bold]

      clmerge pretrain output=world_clip.safetensors

      clmerge pretrain steps=300 batch_size=128
    """
    _launch("pretrain", _options(seed=seed), overrides, multirun, cfg)


@config_app.command("show", context_settings=_PASS_THROUGH)
def config_show(overrides: ShowOverrides = None, benchmark: Benchmark = None, seed: Seed = None,
                for_pretrain: Annotated[bool, typer.Option(
                    "--pretrain", help="Show the config of `clmerge pretrain` instead.")] = False) -> None:
    """Print the composed config (YAML) that finetune, merge, eval and run would use.

    [bold]Examples[/bold]

      clmerge config show

      clmerge config show --benchmark domain_incremental/world finetune=reference

      clmerge config show --pretrain
    """
    if for_pretrain:
        name, options = "pretrain", _options(seed=seed)
    else:
        name, options = "config", _options(benchmark, seed)
    typer.echo(_guard(lambda: hydra_app.show_config([*options, *(overrides or [])], config_name=name)), nl=False)


@app.command("report")
def report_command(
        paths: Annotated[list[Path], typer.Argument(
            metavar="PATH...", show_default=False,
            help="Run or sweep folders (searched recursively for results.json) or results.json files.")],
        out: Annotated[Optional[Path], typer.Option(
            "--out", metavar="DIR", show_default=False,
            help="Also write report.md, report.csv and report.json (every metric, both protocols) here.")] = None,
        metric: Annotated[str, typer.Option(
            "--metric", metavar="NAME",
            help="Metric of the printed table: final_accuracy, final_accuracy_weighted, "
                 "average_incremental_accuracy, own_task_accuracy, forgetting, backward_transfer, "
                 "forward_transfer, zscl_transfer, zscl_average, future_zero_shot_change_mean or "
                 "zero_shot_retention_final.")] = "final_accuracy",
        protocol: Annotated[str, typer.Option(
            "--protocol", metavar="agnostic|aware",
            help="Task-agnostic (all-class head) or task-aware (each task's own classes).")] = "agnostic",
        plots: Annotated[bool, typer.Option(
            "--plots", help="Also write PNG plots under DIR/plots: accuracy-matrix heatmaps, accuracy after "
                            "each step, lambda sensitivity (needs --out).")] = False) -> None:
    """Compare runs and sweeps: methods x benchmarks, mean ± std over seeds.

    Benchmarks with different configs are never averaged together; a sweep's job folder without
    results.json (a failed job) is listed as skipped.

    [bold]Examples[/bold]

      clmerge report clmerge-runs/outputs

      clmerge report clmerge-runs/outputs/multirun/run --out report --plots

      clmerge report runs/a runs/b --metric forgetting --protocol aware
    """
    from rich.console import Console

    from clmerge.reporting import make_report

    _guard(lambda: make_report(list(paths), Console(), out, metric, protocol, plots))


DatasetName = Annotated[str, typer.Argument(
    metavar="NAME", show_default=False,
    help="cifar100, imagenet_r, cub200, cars, domainnet, mnist, svhn, eurosat, gtsrb, resisc45, sun397 or dtd.")]
DataRoot = Annotated[Path, typer.Option(
    "--root", metavar="DIR", help="The data root (paths.data of the runs).")]


@data_app.command("prepare")
def data_prepare(
        name: DatasetName,
        src: Annotated[Path, typer.Option("--src", metavar="PATH", show_default=False,
                                          help="The dataset as distributed (folder or archive).")],
        dst: Annotated[Path, typer.Option("--dst", metavar="DIR", help="The data root to prepare it under.")] = Path(
            "data"),
        seed: Annotated[int, typer.Option("--seed", help="Seed of the split, where the dataset has none.")] = 0,
        test_fraction: Annotated[float, typer.Option(
            "--test-fraction", help="Test share of a seeded split (ImageNet-R, EuroSAT, RESISC45).")] = 0.2) -> None:
    """Turn a dataset's official distribution into the layout clmerge reads, under the data root.

    Image files are never moved or renamed: clmerge writes file lists next to its own manifest.

    [bold]Examples[/bold]

      clmerge data prepare imagenet_r --src ~/downloads/imagenet-r --dst data

      clmerge data prepare cifar100 --src cifar-100-python.tar.gz --dst data
    """

    def action() -> Path:
        from clmerge.data.prepare import prepare

        return prepare(name, src, dst, seed, test_fraction)

    path = _guard(action)
    typer.echo(f"prepared {name} at {path}; check it with `clmerge data check {name} --root {dst}`")


@data_app.command("check")
def data_check(name: DatasetName, root: DataRoot = Path("data"),
               decode: Annotated[bool, typer.Option("--decode", help="Also decode every image.")] = False) -> None:
    """Validate a prepared dataset and print its class and image counts per split (and domain).

    [bold]Examples[/bold]

      clmerge data check domainnet --root data
    """
    from rich.console import Console
    from rich.table import Table

    def action() -> list[Any]:
        from clmerge.data.check import check

        return check(name, root, decode)

    rows = _guard(action)
    table = Table(title=f"{name} under {root}")
    for column in ("split", "domain", "classes", "images"):
        table.add_column(column, justify="right" if column in ("classes", "images") else "left")
    for row in rows:
        table.add_row(row.split, row.domain or "all", str(row.classes), str(row.images))
    Console().print(table)


@data_app.command("list")
def data_list() -> None:
    """List the real datasets, their directories under the data root and what `prepare --src` takes."""
    from clmerge.data.catalog import SPECS

    for spec in SPECS.values():
        typer.echo(f"{spec.name:<11} {spec.title:<13} {spec.directory:<17} --src: {spec.source}")


@store_app.command("verify")
def store_verify(store: Annotated[Path, typer.Argument(
        metavar="STORE", help="The checkpoint store (paths.store of the runs).")] = Path("clmerge-runs/store")) -> None:
    """Check every manifest of the store, the sha256 of every file it records and of every cached head.

    Prints one line per damaged or missing file; exit status 0 when all is intact, 1 when something is
    damaged, 2 when STORE is not a store. Keys another process is writing are skipped.

    [bold]Examples[/bold]

      clmerge store verify

      clmerge store verify /scratch/clmerge-runs/store
    """
    from clmerge.store_verify import verify_store

    verdict = _guard(lambda: verify_store(store))
    for line in [*verdict.busy, *verdict.unrecorded]:
        typer.echo(f"note: {line}")
    for line in verdict.damaged:
        typer.echo(f"damaged: {line}")
    summary = f"{verdict.keys} keys, {verdict.files} recorded files, {verdict.heads} cached heads under {store}"
    if not verdict.intact:
        typer.echo(f"error: {len(verdict.damaged)} problems in {summary}", err=True)
        raise typer.Exit(1)
    typer.echo(f"intact: {summary}")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"clmerge {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Continual learning of CLIP models through model merging."""
