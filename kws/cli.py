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
console = Console(stderr=True, highlight=False)

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
        Path | None, typer.Option("--out", "-o", help="Cache folder (default: features/<dataset name>).")
    ] = None,
    set: SetOption = None,
    workers: WorkersOption = 0,
    force: Annotated[bool, typer.Option("--force", help="Extract again even if the cache is up to date.")] = False,
) -> None:
    """Compute front-end features for a dataset and cache them, per split, for training and evaluation."""
    from kws.config import load_recipe
    from kws.data import load_dataset, summarize, summary_table
    from kws.extract import extract_features

    recipe = load_recipe(config, set)
    found = load_dataset(recipe.data, data)
    console.print(summary_table(found, summarize(found, workers or None)))
    out = out or Path("features") / found.root.stem
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


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    )
