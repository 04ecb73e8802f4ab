"""The `kws` command line: each command parses its options, calls one library function and reports."""

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kws import __version__
from kws.errors import KWSError

app = typer.Typer(
    help="Keyword spotting: features, training, evaluation and detection on real speech.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_SOME_FAILED = 1  # the command finished, but some inputs were skipped
EXIT_ERROR = 2  # the command could not run (bad arguments, settings or data)
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable)


def user_errors_as_messages(command: F) -> F:
    """Turn `KWSError` into one red line and exit 2, and Ctrl-C into a short note and exit 130."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KWSError as error:
            console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing half-written was left behind")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return guarded  # type: ignore[return-value]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"kws {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Keyword spotting: features, training, evaluation and detection on real speech."""


RecipeOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Recipe YAML (recipes/*.yaml); defaults when omitted.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe setting, e.g. features.n_mels=64."),
]
WorkersOption = Annotated[int, typer.Option(min=0, help="Files loaded in parallel (0: one per CPU core).")]
DataArgument = Annotated[
    Path | None,
    typer.Argument(help="Dataset: a Speech Commands-style folder, FSDD recordings or a CSV/JSONL manifest."),
]


@app.command()
@user_errors_as_messages
def dataset(data: DataArgument = None, config: RecipeOption = None, set: SetOption = None) -> None:
    """Show a dataset's classes, splits, speakers, durations and sample rates."""
    from kws.config import load_recipe
    from kws.data import load_dataset, summarize, summary_table

    recipe = load_recipe(config, set)
    found = load_dataset(recipe.data, data)
    summary = summarize(found)
    console.print(summary_table(found, summary))
    for line in summary.unreadable:
        console.print(f"[yellow]unreadable:[/] {line}", soft_wrap=True)
    if summary.unreadable:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
@user_errors_as_messages
def extract(
    data: DataArgument = None,
    config: RecipeOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Cache folder (default: features/<dataset>-<hash>, where kws train looks)."),
    ] = None,
    set: SetOption = None,
    workers: WorkersOption = 0,
    force: Annotated[bool, typer.Option("--force", help="Extract again even if the cache is up to date.")] = False,
) -> None:
    """Compute front-end features for a dataset and cache them, per split, for training and evaluation."""
    from kws.config import load_recipe
    from kws.data import load_dataset, summarize, summary_table
    from kws.extract import default_cache_dir, extract_features

    recipe = load_recipe(config, set)
    found = load_dataset(recipe.data, data)
    console.print(summary_table(found, summarize(found, workers or None)))
    out = out or default_cache_dir(found, recipe.features)
    features = recipe.features
    console.print(
        f"front end: {features.kind}, {features.n_features} features x "
        f"{features.num_frames(features.clip_samples)} frames per {features.clip_s:g} s clip "
        f"at {features.sample_rate} Hz (settings {features.fingerprint()})"
    )
    with _progress() as progress:
        task = progress.add_task("extracting", total=len(found.clips))
        result = extract_features(
            found,
            recipe.data,
            features,
            out,
            workers=workers or None,
            force=force,
            on_progress=lambda n: progress.advance(task, n),
            on_skip=lambda line: progress.console.print(f"[yellow]skipped:[/] {line}", soft_wrap=True),
        )
    stored = ", ".join(f"{split} {count}" for split, count in result.stored.items())
    if result.up_to_date:
        console.print(f"{out}: up to date ({stored} clips); --force extracts again")
    else:
        console.print(f"wrote {out}: {stored} clips in {result.seconds:.1f} s")
    if result.skipped:
        console.print(f"[bold red]{len(result.skipped)} file(s) skipped[/]: see the lines above")
        raise typer.Exit(EXIT_SOME_FAILED)


def _progress(extra: str | None = None) -> Progress:
    """A progress bar on stderr, shown only on a terminal; `extra` is a column template."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    return Progress(*columns, console=console, disable=not sys.stderr.isatty())


@app.command()
@user_errors_as_messages
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/speech_commands.yaml.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/<recipe name>).")] = None,
    set: SetOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (mixed precision on cuda).")] = "auto",
    seed: Annotated[int | None, typer.Option(help="Overrides train.seed.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Overrides train.epochs.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out.")] = False,
    init: Annotated[
        str | None, typer.Option(help="Start from this trained model (a new head when the labels differ).")
    ] = None,
    cache: Annotated[Path, typer.Option(help="Where feature caches are kept and reused.")] = Path("features"),
) -> None:
    """Train a model from a recipe; keeps the best checkpoint by validation accuracy."""
    from kws.config import load_recipe
    from kws.evaluate import report_table
    from kws.train import train as run_training

    overrides = list(set or [])
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    loaded = load_recipe(recipe, overrides)
    run_dir = out or Path("runs") / recipe.stem
    progress = _progress(extra="{task.fields[status]}")
    state: dict = {}

    def on_start(info: dict) -> None:
        for line in info["skipped"]:
            console.print(f"[yellow]skipped:[/] {line}", soft_wrap=True)
        console.print(
            f"{info['architecture']} with {info['parameters']:,} parameters on {info['device']}; "
            f"{info['train_clips']} training clips ({info['clips_per_epoch']} drawn per epoch, balanced), "
            f"{info['validation_clips']} validation clips; labels: {', '.join(info['labels'])}"
        )
        if info["reinitialised"]:
            console.print(f"from {init}: new weights for {', '.join(info['reinitialised'])}")
        state["task"] = progress.add_task(f"epoch {info['start_epoch']}", total=info["clips_per_epoch"], status="")
        state["loss"], state["correct"], state["seen"] = 0.0, 0.0, 0

    def on_batch(clips: int, loss: float, accuracy: float) -> None:
        state["loss"] += loss * clips
        state["correct"] += accuracy * clips
        state["seen"] += clips
        status = f"loss {state['loss'] / state['seen']:.3f} acc {100 * state['correct'] / state['seen']:.1f}%"
        progress.update(state["task"], advance=clips, status=status)

    def on_epoch(record, is_best: bool) -> None:
        progress.console.print(
            f"epoch {record.epoch:3d}/{loaded.train.epochs}  loss {record.train_loss:.3f}  "
            f"train {100 * record.train_accuracy:5.1f}%  validation "
            f"{'n/a' if record.validation_accuracy is None else f'{100 * record.validation_accuracy:5.2f}%'}"
            f"{'  best' if is_best else ''}  ({record.seconds:.0f} s, {state['seen'] / record.seconds:.0f} clips/s)"
        )
        progress.reset(state["task"], description=f"epoch {record.epoch + 1}", status="")
        state["loss"], state["correct"], state["seen"] = 0.0, 0.0, 0

    with progress:
        result = run_training(
            loaded, run_dir, device=device, resume=resume, init=init, cache_root=cache,
            on_start=on_start, on_batch=on_batch, on_epoch=on_epoch,
        )  # fmt: skip
    if result.best_validation_accuracy is None:
        console.print(f"no validation split: kept the last epoch; model: {run_dir / 'best.safetensors'}")
    else:
        console.print(
            f"best validation accuracy {100 * result.best_validation_accuracy:.2f}% at epoch {result.best_epoch}; "
            f"model: {run_dir / 'best.safetensors'}"
        )
    if result.test is not None:
        console.print(report_table(result.test, "testing split (best model)"))


@app.command()
@user_errors_as_messages
def evaluate(
    model: Annotated[str, typer.Argument(help="Model file, run folder, or shipped model name.")],
    data: Annotated[Path, typer.Argument(help="Speech Commands-style folder, FSDD recordings or a manifest.")],
    split: Annotated[str, typer.Option(help="training, validation, testing or all.")] = "testing",
    set: SetOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write the confusion matrix as a PNG here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: WorkersOption = 0,
) -> None:
    """Score a model on a labelled dataset: accuracy, per-class precision/recall/F1, confusion matrix."""
    import json

    from kws.checkpoint import load_model
    from kws.config import apply_overrides
    from kws.data import SPLITS, DataConfig, load_dataset
    from kws.evaluate import confusion_table, dataset_config_for, evaluate_dataset, plot_confusion, report_table
    from kws.settings import build
    from kws.train import resolve_device

    if split not in (*SPLITS, "all"):
        raise typer.BadParameter(f"{split!r}: use training, validation, testing or all", param_hint="--split")
    torch_device = resolve_device(device)
    loaded, info = load_model(model, torch_device)
    data_values = apply_overrides({"data": dataset_config_for(info.recipe, info.labels)}, list(set or []))
    found = load_dataset(build(DataConfig, data_values["data"], "data"), data)
    clips = [clip for clip in found.clips if split == "all" or clip.split == split]
    if not clips:
        raise typer.BadParameter(f"{data}: no clips in the {split} split", param_hint="--split")
    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(clips))
        report, skipped = evaluate_dataset(
            loaded, info.labels, clips, info.features, torch_device, workers or None,
            on_progress=lambda n: progress.advance(task, n),
            on_skip=lambda line: progress.console.print(f"[yellow]skipped:[/] {line}", soft_wrap=True),
        )  # fmt: skip
    title = f"{model} on {data} ({split})"
    console.print(report_table(report, title))
    console.print(confusion_table(report))
    if json_out:
        json_out.write_text(json.dumps({"model": str(model), "data": str(data), "split": split, **report.to_dict()}))
        console.print(f"wrote {json_out}")
    if png:
        plot_confusion(report, png, title)
        console.print(f"wrote {png}")
    if skipped:
        console.print(f"[bold red]{len(skipped)} file(s) skipped[/]: see the lines above")
        raise typer.Exit(EXIT_SOME_FAILED)
