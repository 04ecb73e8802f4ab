"""The `kws` command line: each command parses its options, calls one library function and reports."""

import functools
import math
import shlex
import signal
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
def dataset(
    data: DataArgument = None,
    config: RecipeOption = None,
    set: SetOption = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Also read every recording whole: name the unreadable and the near-silent."),
    ] = False,
    quiet_db: Annotated[
        float,
        typer.Option("--quiet-db", help="With --check: name clips whose loudest 0.1 s is below this, dBFS."),
    ] = -60.0,
    workers: WorkersOption = 0,
) -> None:
    """Show a dataset's classes, splits, speakers, durations and sample rates."""
    from kws.config import load_recipe
    from kws.data import load_dataset, summarize, summary_table
    from kws.extract import quiet_clips

    recipe = load_recipe(config, set)
    found = load_dataset(recipe.data, data)
    summary = summarize(found, workers or None)
    console.print(summary_table(found, summary))
    for line in found.warnings:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    unreadable = summary.unreadable
    if check:
        quiet, whole_read = quiet_clips(found, recipe.features, quiet_db, workers or None)
        unreadable = list(dict.fromkeys([*unreadable, *whole_read]))
        for clip, level in quiet:
            level_text = f"{level:.0f} dBFS" if level > -math.inf else "digital silence"
            console.print(f"[yellow]quiet:[/] {clip.path}: {clip.label}, {clip.split}, loudest 0.1 s at {level_text}; "
                          "most likely no audible word", soft_wrap=True)  # fmt: skip
        spoken = sum(clip.level_db is None for clip in found.clips)
        console.print(f"checked {spoken} recordings: {len(quiet)} quiet (below {quiet_db:g} dBFS), "
                      f"{len(unreadable)} unreadable")  # fmt: skip
    for line in unreadable:
        console.print(f"[yellow]unreadable:[/] {line}", soft_wrap=True)
    if unreadable:
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
    """Store a dataset's clips as training hears them, per split, on disk: training reads them a batch at a time."""
    from kws.config import load_recipe
    from kws.data import load_dataset, summarize, summary_table
    from kws.extract import default_cache_dir, extract_features

    recipe = load_recipe(config, set)
    found = load_dataset(recipe.data, data)
    console.print(summary_table(found, summarize(found, workers or None)))
    out = out or default_cache_dir(found, recipe.features)
    features = recipe.features
    console.print(
        f"clips: {features.clip_s:g} s at {features.sample_rate} Hz, float16, "
        f"{2 * features.clip_samples / 1000:g} kB each on disk (settings {features.fingerprint()})"
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
    # Output for programs goes straight to stdout, never into the bar's console (stderr).
    return Progress(*columns, console=console, disable=not sys.stderr.isatty(), redirect_stdout=False)


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
    """Train a model from a recipe; keeps the best checkpoint by validation accuracy.

    Under torchrun (`torchrun --nproc-per-node N -m kws train RECIPE`) N processes train one model, each on
    its share of every batch; the first process reports and writes the run folder.
    """
    import os

    from kws.config import load_recipe
    from kws.distributed import Processes
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
        for line in info["warnings"]:
            console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
        console.print(
            f"{info['architecture']} with {info['parameters']:,} parameters on {info['device']}; "
            f"{info['train_clips']} training clips ({info['clips_per_epoch']} drawn per epoch, balanced), "
            f"{info['validation_clips']} validation clips; labels: {', '.join(info['labels'])}"
        )
        if info["negative_speech"]:
            recordings, seconds, windows = info["negative_speech"]
            console.print(
                f"negative speech: {recordings} recordings, {seconds / 3600:.2f} h; {windows} windows cut from them "
                f"per epoch as _unknown_"
            )
        if info["reinitialised"]:
            console.print(f"from {init}: new weights for {', '.join(info['reinitialised'])}")
        if loaded.train.distill.teachers:
            distill = loaded.train.distill
            console.print(
                f"distilling from {', '.join(distill.teachers)} (temperature {distill.temperature:g}, "
                f"{100 * distill.weight:g}% of the loss"
                + (", only clips whose label is its top class)" if distill.agreeing_only else ")")
            )
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

    processes = Processes.join(os.environ, device)
    if not processes.main:  # the others train quietly
        run_training(loaded, run_dir, device=device, resume=resume, init=init, cache_root=cache, processes=processes)
        return
    if processes.world > 1:
        console.print(f"{processes.world} processes train together; each takes 1/{processes.world} of every batch")
    with progress:
        result = run_training(
            loaded, run_dir, device=device, resume=resume, init=init, cache_root=cache,
            command=_train_command(recipe, out, overrides, device, init),
            on_start=on_start, on_batch=on_batch, on_epoch=on_epoch, processes=processes,
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


def _train_command(recipe: Path, out: Path | None, overrides: list[str], device: str, init: str | None) -> str:
    """The command that (re)makes this run, for the model card: the settings as given, without --resume."""
    words = ["kws", "train", str(recipe)]
    words += ["--out", str(out)] if out else []
    for override in overrides:
        words += ["--set", override]
    words += ["--device", device] if device != "auto" else []
    words += ["--init", init] if init else []
    return shlex.join(words)


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
    from kws.config import DataConfig, apply_overrides
    from kws.data import SPLITS, load_dataset
    from kws.evaluate import (
        confusion_table,
        dataset_config_for,
        evaluate_dataset,
        mistakes_table,
        plot_confusion,
        report_table,
    )
    from kws.settings import build
    from kws.train import resolve_device

    if split not in (*SPLITS, "all"):
        raise typer.BadParameter(f"{split!r}: use training, validation, testing or all", param_hint="--split")
    torch_device = resolve_device(device)
    loaded, info = load_model(model, torch_device)
    data_values = apply_overrides({"data": dataset_config_for(info.recipe, info.labels, split)}, list(set or []))
    found = load_dataset(build(DataConfig, data_values["data"], "data"), data)
    clips = found.split(split)
    for line in found.warnings if split != "all" else ():
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
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
    if report.mistakes:
        console.print(mistakes_table(report, data if data.is_dir() else data.parent))
    if json_out:
        mistakes = [mistake.to_dict() for mistake in report.mistakes]
        json_out.write_text(json.dumps(
            {"model": str(model), "data": str(data), "split": split, **report.to_dict(), "mistakes": mistakes}
        ))  # fmt: skip
        console.print(f"wrote {json_out}")
    if png:
        plot_confusion(report, png, title)
        console.print(f"wrote {png}")
    if skipped:
        console.print(f"[bold red]{len(skipped)} file(s) skipped[/]: see the lines above")
        raise typer.Exit(EXIT_SOME_FAILED)


ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Model file, run folder, or shipped model name (kws models).")
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
ThresholdOption = Annotated[
    float | None,
    typer.Option(
        help="Smoothed posterior every keyword must reach to fire (default: the threshold in the model's card, "
        "calibrated to a rate of false accepts per hour by `kws calibrate`; else 0.8)."
    ),
]
SmoothingOption = Annotated[float | None, typer.Option(help="Posteriors are averaged over this span (default 300).")]
RefractoryOption = Annotated[
    float | None, typer.Option(help="After a detection nothing fires for this long (default 1.0).")
]
HopOption = Annotated[float | None, typer.Option(help="The model scores a new window this often (default 100).")]
SaveDetectionsOption = Annotated[
    Path | None,
    typer.Option(
        "--save-detections",
        help="Save what each detection heard here, as <keyword>/*.wav (hard negatives where no keyword was said: "
        "train with them as data.extra_unknown).",
    ),
]


def _detector_config(threshold, smoothing_ms, refractory_s, hop_ms, info):
    """The model's own detector (its card's calibrated thresholds, else the defaults), options overriding."""
    from kws.stream import detector_config_for

    return detector_config_for(info, threshold=threshold, smoothing_ms=smoothing_ms, refractory_s=refractory_s,
                               hop_ms=hop_ms)  # fmt: skip


def _detection_values(detection, saver) -> dict:
    """A detection as a JSON line; with --save-detections, where its window was saved."""
    values = detection.to_dict()
    if saver:
        values["saved_as"] = str(saver.path_for(detection))
    return values


def _print_jsonl(values: dict) -> None:
    import json

    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


@app.command()
@user_errors_as_messages
def stream(
    file: Annotated[Path, typer.Argument(help="A recording of any length and format.")],
    model: ModelOption = "speech_commands",
    threshold: ThresholdOption = None,
    smoothing_ms: SmoothingOption = None,
    refractory_s: RefractoryOption = None,
    hop_ms: HopOption = None,
    realtime: Annotated[bool, typer.Option("--realtime", help="Feed the audio at real-time speed.")] = False,
    truth: Annotated[
        Path | None, typer.Option(help="Truth CSV (rows label,seconds): report hits and false accepts.")
    ] = None,
    tolerance_s: Annotated[float, typer.Option(help="How far a detection may be from its truth time.")] = 0.75,
    report: Annotated[Path | None, typer.Option(help="With --truth: write the scores as JSON here.")] = None,
    save_detections: SaveDetectionsOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Run a long recording through the streaming detector; detections go to stdout as JSON lines."""
    import json

    from kws.audio import read_info
    from kws.checkpoint import load_model
    from kws.mine import DetectionSaver, source_id
    from kws.stream import KeywordDetector, detect_in_file, is_keyword, read_truth, score_detections
    from kws.train import resolve_device

    truth_events = read_truth(truth) if truth else None
    audio = read_info(file)
    torch_device = resolve_device(device)
    loaded, info = load_model(model, torch_device)
    config = _detector_config(threshold, smoothing_ms, refractory_s, hop_ms, info)
    detector = KeywordDetector(loaded, info.labels, info.features, config, torch_device)
    saver = DetectionSaver(detector, save_detections, source_id(file)) if save_detections else None
    with _progress() as progress:
        task = progress.add_task("detecting", total=audio.duration_s)
        run = detect_in_file(
            saver or detector, file, realtime,
            on_detection=lambda detection: _print_jsonl(_detection_values(detection, saver)),
            on_progress=lambda seconds: progress.advance(task, seconds),
        )  # fmt: skip
    console.print(
        f"{len(run.detections)} detection(s) in {run.duration_s:.1f} s of audio, processed in {run.seconds:.1f} s "
        f"(real-time factor {run.real_time_factor:.4f}); {config.describe()}"
    )
    if saver:
        console.print(f"saved {len(saver.saved)} window(s) in {save_detections}")
    if truth_events is None:
        return
    keywords = tuple(label for label in info.labels if is_keyword(label))
    score = score_detections(run.detections, truth_events, keywords, run.duration_s, tolerance_s)
    percent = score.percentages()
    if score.keywords_spoken:
        console.print(
            f"{score.keywords_spoken} keywords spoken: {percent['matched']:.1f}% matched, {percent['correct']:.1f}% "
            f"correctly, {percent['wrong']:.1f}% wrongly, {percent['false_positives']:.1f}% false positives "
            f"(TensorFlow's figures, tolerance {tolerance_s:g} s)"
        )
    hits = "no keyword spoken: every detection is a false accept; "
    if score.keywords_spoken:
        hits = f"hits {100 * score.hit_rate:.1f}% ({score.correct}/{score.keywords_spoken}), "
    console.print(f"{hits}{score.false_accepts} false accept(s): {score.false_accepts_per_hour:.1f} per hour")
    if report:
        values = {"model": model, "file": str(file), "detector": config.__dict__, **score.to_dict()}
        report.write_text(json.dumps(values, indent=1))
        console.print(f"wrote {report}")


@app.command()
@user_errors_as_messages
def mine(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Recordings in which no keyword is said: files, folders (searched recursively), CSV/JSONL manifests."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the windows (<keyword>/*.wav, mined.jsonl); train with it as data.extra_unknown. "
            "A rerun continues where a previous one stopped.",
        ),
    ],
    model: ModelOption = "speech_commands",
    threshold: ThresholdOption = None,
    smoothing_ms: SmoothingOption = None,
    refractory_s: RefractoryOption = None,
    hop_ms: HopOption = None,
    split: Annotated[
        str | None, typer.Option(help="Only this split's rows of a manifest: training, validation or testing.")
    ] = None,
    set: SetOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Save the audio that makes the detector fire in recordings without keywords: false accepts to train on."""
    from rich.markup import escape

    from kws.checkpoint import load_model, resolve_model_path
    from kws.config import load_recipe
    from kws.data import SPLITS
    from kws.mine import MANIFEST_SUFFIXES, find_recordings, mine_recordings, mining_table
    from kws.train import resolve_device

    if split is not None and split not in SPLITS:
        raise typer.BadParameter(f"{split!r}: use training, validation or testing", param_hint="--split")
    if split is not None and not any(path.suffix.lower() in MANIFEST_SUFFIXES for path in paths):
        raise typer.BadParameter("chooses rows of a manifest (.csv, .jsonl): none given", param_hint="--split")
    recipe = load_recipe(None, set)  # data settings say how a manifest without a split column is split
    recordings = find_recordings(paths, split, recipe.data)
    torch_device = resolve_device(device)
    loaded, info = load_model(model, torch_device)
    config = _detector_config(threshold, smoothing_ms, refractory_s, hop_ms, info)
    with _progress() as progress:
        task = progress.add_task("mining", total=len(recordings))
        report = mine_recordings(
            loaded, info.labels, info.features, recordings, out, config, torch_device,
            model_name=str(resolve_model_path(model).resolve()),
            on_recording=lambda path: progress.advance(task),
            on_skip=lambda line: progress.console.print(f"[yellow]skipped:[/] {escape(line)}", soft_wrap=True),
        )  # fmt: skip
    console.print(mining_table(report))
    console.print(
        f"mined {report.mined_now} recording(s) in {report.seconds:.1f} s"
        + (f"; {report.already_done} mined before, skipped" if report.already_done else "")
        + escape(f"; {len(report.windows)} window(s) in {out}: train on them with data.extra_unknown: [{out}]")
    )
    if report.failed:
        console.print(f"[bold red]{len(report.failed)} file(s) skipped[/]: see the lines above")
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command("make-stream-test")
@user_errors_as_messages
def make_stream_test(
    data: Annotated[Path, typer.Argument(help="Speech Commands-style folder, FSDD recordings or a manifest.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The stream to write (.wav; .csv and .json beside).")],
    split: Annotated[str, typer.Option(help="Whose words: training, validation or testing.")] = "testing",
    config: RecipeOption = None,
    set: SetOption = None,
    gap_s: Annotated[
        tuple[float, float], typer.Option(help="Background noise between words: uniform in [low, high] s.")
    ] = (1.0, 2.0),
    noise_volume: Annotated[float, typer.Option(help="Background noise gain (1: as recorded).")] = 1.0,
    max_words: Annotated[int | None, typer.Option(help="At most this many words (default: the whole split).")] = None,
    seed: Annotated[int, typer.Option(help="Word order, gaps and noise.")] = 0,
    negative: Annotated[
        bool,
        typer.Option(
            "--negative",
            help="DATA is speech in which no keyword is said (e.g. ../shared/data/negatives/manifest.csv): lay "
            "every recording of the split end to end --repeats times, each time at another gain (-12 to +6 dB) "
            "over other background noise at --snr-db, 0.3-1.2 s apart. Every detection in it is a false accept.",
        ),
    ] = False,
    repeats: Annotated[int, typer.Option(help="With --negative: times each recording is laid.")] = 4,
    snr_db: Annotated[
        tuple[float, float], typer.Option(help="With --negative: speech-to-noise ratio, uniform in [low, high] dB.")
    ] = (5.0, 30.0),
    noise_dir: Annotated[
        Path | None, typer.Option(help="Background noise recordings (default: DATA's _background_noise_ folder).")
    ] = None,
    workers: WorkersOption = 0,
) -> None:
    """Make a streaming test: one split's words at known times over its background noise, with a truth CSV;
    or, with --negative, a long stream of speech without keywords, to count false accepts per hour."""
    from dataclasses import replace

    from kws.config import load_recipe
    from kws.data import SPLITS
    from kws.stream_test import make_negative_stream
    from kws.stream_test import make_stream_test as make

    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r}: use training, validation or testing", param_hint="--split")
    if not 0 <= gap_s[0] <= gap_s[1]:
        raise typer.BadParameter(f"{gap_s}: need 0 <= low <= high", param_hint="--gap-s")
    if repeats < 1:
        raise typer.BadParameter(f"{repeats}: must be at least 1", param_hint="--repeats")
    recipe = load_recipe(config, set)
    data_config = replace(recipe.data, noise_dir=str(noise_dir)) if noise_dir else recipe.data
    if negative:
        test = make_negative_stream(data, out, data_config, split, recipe.features.sample_rate, repeats, snr_db,
                                    seed=seed, workers=workers or None)  # fmt: skip
    else:
        test = make(data, out, data_config, split, recipe.features.sample_rate, gap_s, noise_volume, max_words,
                    seed, workers or None)  # fmt: skip
    for line in test.skipped:
        console.print(f"[yellow]skipped:[/] {line}", soft_wrap=True)
    what = f"{len(test.words)} recordings of the {split} split" + (f", {repeats} times" if negative else "")
    console.print(
        f"wrote {test.wav} ({test.duration_s / 60:.1f} min, {what}), {test.truth} (label,seconds) and {test.details}"
    )
    if negative and not test.noise_recordings:
        console.print("[yellow]no background noise found[/]: the speech lies over silence (give --noise-dir)")
    if test.skipped:
        console.print(f"[bold red]{len(test.skipped)} file(s) skipped[/]: see the lines above")
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
@user_errors_as_messages
def classify(
    paths: Annotated[list[Path], typer.Argument(help="Audio files and folders (searched recursively).")],
    model: ModelOption = "speech_commands",
    output_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="table, jsonl or csv (default: table on a terminal, jsonl otherwise); --out: jsonl, csv, parquet.",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Labels reported per file, best first.")] = 3,
    hop_ms: Annotated[
        float, typer.Option(min=1.0, max=1000.0, help="Files longer than the model's window are scanned this often.")
    ] = 100.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 64,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    engine: Annotated[
        str, typer.Option(help="local (this process) or dask (a Dask cluster: --address, or a local one).")
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="The Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: start a local cluster).")
    ] = None,
    processes: Annotated[
        int, typer.Option(min=0, help="Worker processes of the local Dask cluster (0: one per CPU core).")
    ] = 0,
    worker_threads: Annotated[int, typer.Option(min=1, help="torch threads in each Dask worker.")] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the results into this folder, one file per partition (--format jsonl, csv or parquet); "
            "a rerun skips the partitions done."
        ),
    ] = None,
    partition_files: Annotated[int, typer.Option(min=1, help="Files per partition (--engine dask, --out).")] = 1000,
) -> None:
    """Label audio files of any length; a long recording is scanned and its best window reported."""
    import csv
    import json
    import os
    import time
    from contextlib import nullcontext

    from rich.markup import escape

    from kws.batch import (
        ENGINES,
        ClassifyOptions,
        PartitionFolder,
        classify_in_partitions,
        describe_run,
        partition_runner,
    )
    from kws.checkpoint import load_model, resolve_model_path
    from kws.classify import classify_files, csv_fields, find_audio_files, results_table, summary_line
    from kws.train import resolve_device

    if engine not in ENGINES:
        raise typer.BadParameter(f"{engine!r}: use {' or '.join(ENGINES)}", param_hint="--engine")
    formats = ("jsonl", "csv", "parquet") if out else ("table", "jsonl", "csv")
    output_format = output_format or ("jsonl" if out or not sys.stdout.isatty() else "table")
    if output_format not in formats:
        hint = "" if out else " (parquet needs --out)"
        raise typer.BadParameter(
            f"{output_format!r}: use {', '.join(formats[:-1])} or {formats[-1]}{hint}", param_hint="--format"
        )
    if output_format == "parquet":
        _require("pyarrow", "--format parquet", "pip install 'kws[cluster]'")
    torch_device = resolve_device(device)
    files = find_audio_files(paths)
    stdout = sys.stdout  # rows go here, not through the progress bar's redirection of sys.stdout to stderr
    to_stdout = out is None
    rows = (
        csv.DictWriter(stdout, csv_fields(top_k), lineterminator="\n") if to_stdout and output_format == "csv" else None
    )
    results = []
    started = time.perf_counter()
    if engine == "local" and out is None:  # one stream of results, no partitions
        loaded, info = load_model(model, torch_device)
        classified = classify_files(loaded, info, files, top_k, hop_ms, batch_size, workers or None, torch_device)
        runner = nullcontext()
    else:
        if engine == "dask":
            _require("distributed", "--engine dask", "pip install 'kws[cluster]'")
        model_path = resolve_model_path(model)
        options = ClassifyOptions(top_k, hop_ms, batch_size, str(torch_device), worker_threads, workers or None)
        folder = PartitionFolder(out, output_format, describe_run(model_path, files, options, partition_files)) \
            if out else None  # fmt: skip
        runner = partition_runner(engine, model_path, options, address, processes or os.cpu_count() or 1)

    def said_earlier(partitions: int) -> None:
        console.print(f"{out}: {partitions} partition(s) done by an earlier run are read back, not run again")

    with runner as run_partitions, _progress() as progress:
        if run_partitions is not None:
            classified = classify_in_partitions(
                files, options, run_partitions, partition_files, folder, on_earlier=said_earlier
            )
        if rows:
            rows.writeheader()
        task = progress.add_task("classifying", total=len(files))
        for result in classified:
            results.append(result)
            if result.error is not None:
                progress.console.print(f"[yellow]skipped:[/] {escape(result.error)}", soft_wrap=True)
            if to_stdout and output_format == "jsonl":
                stdout.write(json.dumps(result.to_dict()) + "\n")
            elif rows:
                rows.writerow(result.to_csv_row(top_k))
            progress.advance(task)
    seconds = time.perf_counter() - started
    if to_stdout and output_format == "table":
        Console(file=stdout, highlight=False).print(results_table(results, top_k))
    if out is not None:
        console.print(f"results in {out}/part-*.{output_format}")
    console.print(summary_line(results, seconds))
    if any(result.error is not None for result in results):
        raise typer.Exit(EXIT_SOME_FAILED)


def _require(module: str, what: str, install: str) -> None:
    """Refuse, naming the package to install, when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise KWSError(f"{what} needs the {module} package: {install}")


@app.command()
@user_errors_as_messages
def listen(
    model: ModelOption = "speech_commands",
    device: Annotated[
        str | None, typer.Option("--device", "-d", help="Input device: index or part of its name (default input).")
    ] = None,
    list_devices: Annotated[bool, typer.Option("--list-devices", help="List the input devices and exit.")] = False,
    threshold: ThresholdOption = None,
    smoothing_ms: SmoothingOption = None,
    refractory_s: RefractoryOption = None,
    hop_ms: HopOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also append detections here as JSON lines.")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")] = None,
    save_detections: SaveDetectionsOption = None,
) -> None:
    """Spot keywords live on a microphone; detections go to stdout as JSON lines when it is not a terminal."""
    import datetime
    import json

    from rich.table import Table

    from kws.checkpoint import load_model
    from kws.errors import DeviceError
    from kws.microphone import Microphone, find_input_device, input_devices
    from kws.microphone import listen as run_listening
    from kws.mine import DetectionSaver
    from kws.stream import KeywordDetector

    if list_devices:
        found_devices = input_devices()
        if not found_devices:
            raise DeviceError("no audio input devices found (no microphone, or no sound server running)")
        table = Table("index", "name", "inputs", "rate (Hz)", "default", title="input devices", title_justify="left")
        for found in found_devices:
            table.add_row(str(found.index), found.name, str(found.channels), str(found.sample_rate),
                          "yes" if found.is_default else "")  # fmt: skip
        Console(highlight=False).print(table)
        return
    loaded, info = load_model(model)
    config = _detector_config(threshold, smoothing_ms, refractory_s, hop_ms, info)
    detector = KeywordDetector(loaded, info.labels, info.features, config)
    started = datetime.datetime.now()
    saver = DetectionSaver(detector, save_detections, f"listen-{started:%Y%m%d-%H%M%S}") if save_detections else None
    chosen = find_input_device(device)
    microphone = Microphone(chosen, info.features.sample_rate, block_s=config.hop_ms / 1000)
    to_stdout = not sys.stdout.isatty()
    log = output.open("a") if output else None
    display = _ListenDisplay(chosen.name, chosen.sample_rate, info.features.sample_rate, model)

    def on_audio(seconds: float, level_db: float, found: list) -> None:
        for detection in found:
            values = {
                **_detection_values(detection, saver),
                "wall_time": datetime.datetime.now().isoformat(timespec="milliseconds"),
            }
            if to_stdout:
                _print_jsonl(values)
            if log:
                log.write(json.dumps(values) + "\n")
                log.flush()
        display.update(seconds, level_db, found)

    # Ctrl-C and `kill` both end listening with the summary, even where the shell that started kws
    # ignores SIGINT (a background job does), which would otherwise leave Ctrl-C without effect.
    stop_handlers = {signum: signal.signal(signum, _stop_listening) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with display:
            summary = run_listening(saver or detector, microphone, duration, on_ready=display.ready, on_audio=on_audio)
    finally:
        for signum, handler in stop_handlers.items():
            signal.signal(signum, handler)
        if log:
            log.close()
    counts = ", ".join(f"{keyword} {count}" for keyword, count in _count(summary.detections).items()) or "none"
    console.print(
        f"{'stopped' if summary.interrupted else 'done'}: listened {summary.seconds:.1f} s, "
        f"{len(summary.detections)} detection(s) ({counts})"
        + (f"; {summary.overflows} input overflow(s): audio was dropped" if summary.overflows else "")
        + (f"; saved {len(saver.saved)} window(s) in {save_detections}" if saver else "")
    )


def _stop_listening(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _count(detections: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for detection in detections:
        counts[detection.keyword] = counts.get(detection.keyword, 0) + 1
    return counts


class _ListenDisplay:
    """A live panel on a terminal (level meter, elapsed time, last detections); plain lines otherwise."""

    def __init__(self, device: str, device_rate: int, model_rate: int, model: str) -> None:
        from rich.live import Live

        self.header = f"listening on {device} ({device_rate} Hz -> {model_rate} Hz) with {model}"
        self.live = Live(console=console, refresh_per_second=10, transient=False) if console.is_terminal else None
        self.recent: list = []
        self.seconds, self.level_db = 0.0, float("-inf")

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.live:
            self.live.__exit__(*exc_info)

    def ready(self) -> None:
        if self.live:
            self.live.update(self._render())
        else:
            console.print(f"{self.header}; Ctrl-C stops")

    def update(self, seconds: float, level_db: float, found: list) -> None:
        self.seconds, self.level_db = seconds, level_db
        self.recent = (self.recent + found)[-8:]
        if self.live:
            self.live.update(self._render())
        else:
            for detection in found:
                console.print(f"{detection.time_s:8.2f} s  {detection.keyword}  {detection.score:.2f}")

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        level = max(self.level_db, -80.0)
        filled = round((level + 80.0) / 80.0 * 30)
        meter = Text("level ") + Text("#" * filled, style="green" if level < -6 else "red") + Text(
            "." * (30 - filled), style="dim"
        )  # fmt: skip
        meter.append(f" {level:6.1f} dBFS  {self.seconds:7.1f} s  Ctrl-C stops")
        lines = [Text(self.header, style="bold"), meter]
        lines += [Text(f"{d.time_s:8.2f} s  {d.keyword:<10} {d.score:.2f}", style="cyan") for d in self.recent]
        return Group(*lines)


viz_app = typer.Typer(
    help="Pictures of what a model sees and learned; each writes a PNG.", no_args_is_help=True,
    rich_markup_mode="rich",
)  # fmt: skip
app.add_typer(viz_app, name="viz")
OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="The PNG to write (default: in this folder).")]
WavArgument = Annotated[Path, typer.Argument(help="A recording (any format soundfile reads).")]
ModelArgument = Annotated[str, typer.Argument(help="Model file, run folder, or shipped model name.")]


def _wrote(path: Path) -> None:
    console.print(f"wrote {path}")


@viz_app.command("features")
@user_errors_as_messages
def viz_features(wav: WavArgument, model: ModelOption = "speech_commands", out: OutOption = None) -> None:
    """The waveform and the model's own front-end output (log-mel, STFT, MFCC or FIR energies), in s and Hz."""
    from kws.checkpoint import load_model
    from kws.viz import plot_features

    loaded, info = load_model(model)
    out = out or Path(f"{wav.stem}-features.png")
    plot_features(loaded, info, wav, out)
    _wrote(out)


@viz_app.command("filters")
@user_errors_as_messages
def viz_filters(model: ModelArgument, out: OutOption = None) -> None:
    """First-layer filters: 2D kernels as time-frequency patches; FIR impulse and magnitude responses."""
    from kws.checkpoint import load_model, resolve_model_path
    from kws.viz import plot_filters

    loaded, info = load_model(model)
    out = out or Path(f"{resolve_model_path(model).stem}-filters.png")
    plot_filters(loaded, info, out)
    _wrote(out)


@viz_app.command("activations")
@user_errors_as_messages
def viz_activations(
    model: ModelArgument,
    wav: WavArgument,
    out: OutOption = None,
    channels: Annotated[int, typer.Option(min=1, max=16, help="Channels shown per stage.")] = 3,
) -> None:
    """Activation maps of each stage for one clip: its strongest channels, on the clip's time axis."""
    from kws.checkpoint import load_model
    from kws.viz import plot_activations

    loaded, info = load_model(model)
    out = out or Path(f"{wav.stem}-activations.png")
    plot_activations(loaded, info, wav, out, channels)
    _wrote(out)


@viz_app.command("cam")
@user_errors_as_messages
def viz_cam(
    model: ModelArgument,
    wav: WavArgument,
    out: OutOption = None,
    label: Annotated[str | None, typer.Option(help="Explain this label (default: the predicted one).")] = None,
) -> None:
    """Grad-CAM: which time-frequency regions drove the decision for the predicted label (or --label)."""
    from kws.checkpoint import load_model
    from kws.viz import plot_cam

    loaded, info = load_model(model)
    out = out or Path(f"{wav.stem}-cam.png")
    result = plot_cam(loaded, info, wav, out, label).data["result"]
    console.print(f"{result.label} (p = {result.probability:.2f})")
    _wrote(out)


@app.command()
@user_errors_as_messages
def synth(
    phrases: Annotated[list[str], typer.Argument(help="Words or phrases to say; each gets a folder (spaces as _).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write into: a folder per word, as Speech Commands.")
    ],
    near_misses: Annotated[
        int,
        typer.Option(
            "--near-misses", min=0, help="Also this many words that sound like each one-word phrase, in _near_<word>/."
        ),
    ] = 0,
    engines: Annotated[
        str | None,
        typer.Option(help="Comma-separated: espeak-ng, flite, festival, piper (default: every one installed)."),
    ] = None,
    variants: Annotated[int, typer.Option(min=1, help="Takes of each text per voice, each at its rate and pitch.")] = 2,
    seed: Annotated[int, typer.Option(help="Which near misses, and the takes' rates and pitches.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Syntheses in parallel (0: one per CPU core).")] = 0,
) -> None:
    """Say words with offline text-to-speech voices: a folder per phrase, each voice a speaker.

    With --near-misses, words that sound like each keyword go to DIR/_near_<word>/: negatives, which
    the Speech Commands layout skips; train with them as data.extra_unknown=[DIR/_near_<word>].
    Files already made with the same settings are kept, so an interrupted run resumes.
    """
    from rich.markup import escape

    from kws.synth import available_voices, phrase_sets, summary_table, write_synthetic_set

    wanted = [name.strip() for name in engines.split(",") if name.strip()] if engines else None
    voices = available_voices(wanted)
    found = {voice.engine for voice in voices}
    for engine in wanted or []:
        if engine not in found:
            console.print(f"[yellow]skipped:[/] {engine} is not installed")
    if not voices:
        raise typer.BadParameter("none of these engines is installed", param_hint="--engines")
    texts, notes = phrase_sets(phrases, near_misses, seed)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    with _progress() as progress:
        task = progress.add_task("synthesizing", total=None)
        summary = write_synthetic_set(
            out, texts, voices, variants, seed, workers=workers or None,
            on_clip=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    console.print(summary_table(summary, f"{out} ({len(voices)} voices)"))
    for line in summary.failures:
        console.print(f"[yellow]failed:[/] {escape(line)}", soft_wrap=True)
    if summary.failures:
        console.print(f"[bold red]{len(summary.failures)} synthesis(es) failed[/]: see the lines above")
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command("train-word")
@user_errors_as_messages
def train_word(
    phrases: Annotated[list[str], typer.Argument(help="The word or phrase to spot (several: one model for all).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: the model is OUT/best.safetensors.")],
    negatives: Annotated[
        Path,
        typer.Option(help="Speech in which the phrase is not said (manifest); rows that say it are left out."),
    ] = Path("../shared/data/negatives/manifest.csv"),
    other_words: Annotated[
        Path, typer.Option(help="A folder per word of other words (Speech Commands layout): negatives and noise.")
    ] = Path("../shared/data/speech_commands"),
    engines: Annotated[
        str | None,
        typer.Option(help="Comma-separated: espeak-ng, flite, festival, piper (default: every one installed)."),
    ] = None,
    variants: Annotated[int, typer.Option(min=1, help="Takes of the phrase per voice and intonation.")] = 8,
    near_misses: Annotated[int, typer.Option("--near-misses", min=0, help="Words that sound like each word.")] = 40,
    false_accepts_per_hour: Annotated[
        float, typer.Option("--false-accepts-per-hour", help="The detector's target on validation speech.")
    ] = 1.0,
    mining_rounds: Annotated[
        int, typer.Option(min=0, help="Rounds of fine-tuning on mined false accepts (each adds minutes).")
    ] = 0,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The recipe (default: new_word).")] = None,
    set: SetOption = None,
    seed: Annotated[int, typer.Option(help="Near misses, takes and training.")] = 0,
    init: Annotated[
        str, typer.Option(help="Start from this trained model (file, run folder or shipped name); none: from scratch.")
    ] = "speech_commands12",
    device: DeviceOption = "auto",
    workers: WorkersOption = 0,
) -> None:
    """A model for a word nobody has recorded, from its text alone.

    The phrase said by every offline voice (espeak-ng, flite, festival, piper) at other rates, pitches
    and intonations; words that sound like it and real speech without it as negatives (recordings of
    the phrase itself are left out); recipes/new_word.yaml; a detector calibrated to
    --false-accepts-per-hour on validation speech; a card. Rerun the same command to continue an
    interrupted run.
    """
    from kws.train_word import DEFAULT_RECIPE, WordPlan
    from kws.train_word import train_word as make_word_model

    wanted = tuple(name.strip() for name in engines.split(",") if name.strip()) if engines else None
    plan = WordPlan(tuple(phrases), str(negatives), str(other_words), wanted, variants, near_misses,
                    str((config or DEFAULT_RECIPE).resolve()), tuple(set or []), false_accepts_per_hour,
                    mining_rounds, seed, None if init == "none" else init)  # fmt: skip

    def on_epoch(record, is_best: bool) -> None:
        console.print(f"  epoch {record.epoch:3d}  loss {record.train_loss:.3f}  validation "
                      f"{100 * (record.validation_accuracy or 0):5.2f}%{'  best' if is_best else ''}  "
                      f"({record.seconds:.0f} s)")  # fmt: skip

    command = shlex.join(["kws", "train-word", *sys.argv[sys.argv.index("train-word") + 1 :]]) \
        if "train-word" in sys.argv else None  # fmt: skip
    result = make_word_model(plan, out, device, workers or None, console.print, on_epoch, command)
    for source, count in result.excluded.items():
        console.print(f"left out {count} recording(s) of {', '.join(phrases)} from {source}")
    validation = result.validation
    if validation:
        low, high = validation["false_accepts_per_hour_95"]
        console.print(
            f"detector: thresholds {', '.join(f'{k} {v:.4f}' for k, v in result.thresholds.items())}; on the "
            f"validation streams {100 * validation['hit_rate']:.1f}% of the synthetic phrases found, "
            f"{validation['false_accepts_per_hour']:.2f} false accepts per hour ({low:.2f}-{high:.2f})"
        )
    console.print(f"model: {result.model} ({result.minutes['total']:.1f} min); use it with --model {out}")


@app.command()
@user_errors_as_messages
def models(
    paths: Annotated[list[str] | None, typer.Argument(help="Model files or run folders to list as well.")] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="table (for people), csv or jsonl (every figure, for programs).")
    ] = "table",
) -> None:
    """List the shipped models (and any given): parameters, size, accuracy, false alarms, cost, keywords.

    test: accuracy on the testing split (speakers never trained on); FA/h: false accepts per hour on
    continuous speech without keywords where the card measured it (`kws card --negatives`), else on a
    stream of the testing speakers' words; ms: latency per window on one CPU thread. csv and jsonl add the
    architecture and multiply-accumulates per window. `kws card MODEL` shows everything measured.
    """
    import csv
    import json

    from kws.card import describe_models, models_table

    if output_format not in ("table", "csv", "jsonl"):
        raise typer.BadParameter(f"{output_format!r}: use table, csv or jsonl", param_hint="--format")
    rows = describe_models(paths or [])
    if output_format == "table":
        Console(highlight=False).print(models_table(rows))
    elif output_format == "jsonl":
        for row in rows:
            typer.echo(json.dumps(row))
    else:
        writer = csv.DictWriter(sys.stdout, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "keywords": " ".join(row["keywords"])} for row in rows)


@app.command()
@user_errors_as_messages
def calibrate(
    model: ModelArgument,
    data: Annotated[
        Path, typer.Option(help="Recordings of the keywords (e.g. ../shared/data/speech_commands): the keyword stream.")
    ],
    negatives: Annotated[
        Path,
        typer.Option(help="Speech in which no keyword is said (e.g. ../shared/data/negatives/manifest.csv)."),
    ],
    false_accepts_per_hour: Annotated[
        float, typer.Option("--false-accepts-per-hour", help="The target: all keywords together, per hour.")
    ] = 1.0,
    split: Annotated[str, typer.Option(help="Calibrate on this split (never the one you report).")] = "validation",
    repeats: Annotated[int, typer.Option(help="Times each negative recording is laid in its stream.")] = 4,
    streams: Annotated[
        Path | None, typer.Option(help="Keep the streams in this folder and reuse them (default: a temporary one).")
    ] = None,
    smoothing_ms: SmoothingOption = None,
    refractory_s: RefractoryOption = None,
    hop_ms: HopOption = None,
    one_threshold: Annotated[
        bool,
        typer.Option(
            "--one-threshold",
            help="One threshold for every keyword instead of one each: fewer hits, and fewer surprises on "
            "speech the streams do not hold (bench/RESULTS.md).",
        ),
    ] = False,
    write: Annotated[
        bool, typer.Option("--write", help="Store the thresholds in the model's card: stream and listen use them.")
    ] = False,
    workers: WorkersOption = 0,
) -> None:
    """Calibrate a threshold per keyword to a target rate of false accepts per hour on continuous speech.

    Makes two streams of the split: DATA's keywords 1-2 s apart, and NEGATIVES' speech laid end to end
    over DATA's background noise; scores both once; counts every wrong firing on both (speech without
    keywords, other words, a keyword taken for another); starts each keyword just above its highest one
    and spends the target where it buys the most hits; reports the hits and false accepts it gives.
    """
    import tempfile

    from rich.table import Table

    from kws.calibrate import calibrate_model, detector_card, make_streams
    from kws.card import write_card
    from kws.checkpoint import load_model, resolve_model_path
    from kws.data import SPLITS

    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r}: use training, validation or testing", param_hint="--split")
    if not false_accepts_per_hour > 0:
        raise typer.BadParameter("must be positive", param_hint="--false-accepts-per-hour")
    loaded, info = load_model(model)
    base = _detector_config(None, smoothing_ms, refractory_s, hop_ms, info)
    with tempfile.TemporaryDirectory(prefix="kws-calibrate-") as temporary:
        folder = streams or Path(temporary)
        with console.status(f"making the {split} streams in {folder}"):
            keyword_path, negative_path = make_streams(data, negatives, folder, split, info.features.sample_rate,
                                                       repeats, workers or None)  # fmt: skip
        with console.status("scoring both streams"):
            config, point = calibrate_model(loaded, info, keyword_path, negative_path, false_accepts_per_hour, base,
                                            per_keyword=not one_threshold)  # fmt: skip
    table = Table(
        "keyword",
        "threshold",
        "hits",
        "hits %",
        "false accepts",
        title_justify="left",
        title=f"{model}: thresholds for {false_accepts_per_hour:g} false accept(s) an hour, {split} streams",
    )
    for keyword, (found, spoken) in point.hits_by_keyword.items():
        table.add_row(keyword, f"{config.threshold_of(keyword):.4f}", f"{found}/{spoken}",
                      f"{100 * found / max(spoken, 1):.1f}", str(point.false_accepts_by_keyword[keyword]))  # fmt: skip
    low, high = point.interval_per_hour()
    table.add_section()
    table.add_row("all", "", f"{point.hits}/{point.keywords_spoken}", f"{100 * point.hit_rate:.1f}",
                  str(point.false_accepts), style="bold")  # fmt: skip
    table.caption = (
        f"{point.false_accepts} false accept(s) in {point.negative_hours:.2f} h of speech without keywords: "
        f"{point.false_accepts_per_hour:.2f} per hour (95% interval {low:.2f}-{high:.2f}); "
        f"{point.keyword_stream_false_accepts} more in the keyword stream (wrong keywords, other words)"
    )
    Console(stderr=True, highlight=False).print(table)
    if write:
        names = {"split": split, "data": str(data), "negatives": str(negatives), "repeats": repeats}
        write_card(model, {**info.card, "detector": detector_card(config, false_accepts_per_hour, point, names)})
        console.print(f"stored the thresholds in {resolve_model_path(model)}: stream and listen now use them")


@app.command()
@user_errors_as_messages
def card(
    model: ModelArgument,
    data: Annotated[
        Path | None, typer.Option(help="Measure the card on this dataset's testing split (speakers never heard).")
    ] = None,
    stream: Annotated[
        Path | None, typer.Option(help="With --data: this stream test (.wav, truth .csv beside) instead of a new one.")
    ] = None,
    negatives: Annotated[
        Path | None,
        typer.Option(
            help="With --data: also count false accepts per hour on this speech without keywords "
            "(its testing split, e.g. ../shared/data/negatives/manifest.csv)."
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="testing, or all (every recording of --data: new speakers, no split lists needed).")
    ] = "testing",
    write: Annotated[bool, typer.Option("--write", help="Store the measured card in the model file.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the card as JSON here.")] = None,
    workers: WorkersOption = 0,
) -> None:
    """A model's card: how it was made, its size and cost, and how well it does on unseen speakers.

    Without --data, shows the card stored in the file; with it, measures a new one: test accuracy and
    per-class recall, streaming hits and false accepts per hour, multiply-accumulates, CPU latency.
    """
    import json
    from dataclasses import replace

    from kws.card import card_lines, measure_card, write_card
    from kws.checkpoint import read_info, resolve_model_path

    if (write or stream) and data is None:
        raise typer.BadParameter("--write and --stream need --data to measure on", param_hint="--data")
    if split not in ("testing", "all"):
        raise typer.BadParameter(f"{split!r}: use testing or all", param_hint="--split")
    info = read_info(model)
    if data is not None:
        with console.status("measuring") as status:
            measured = measure_card(model, data, stream, workers or None, status.update, negatives, split)
        info = replace(info, card=measured)
    Console(highlight=False, soft_wrap=True).print("\n".join(card_lines(model, info)), markup=False)
    if json_out:
        json_out.write_text(json.dumps(info.card, indent=1) + "\n")
        console.print(f"wrote {json_out}")
    if write:
        write_card(model, info.card)
        console.print(f"stored the card in {resolve_model_path(model)}")


@app.command()
@user_errors_as_messages
def export(
    model: ModelArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="The ONNX file to write (.onnx).")],
    int8: Annotated[
        bool,
        typer.Option("--int8", help="Quantize the network to int8 (onnxruntime, static), calibrated on --data."),
    ] = False,
    data: Annotated[
        Path | None, typer.Option(help="With --int8: the dataset whose training clips calibrate the quantization.")
    ] = None,
    calibration_clips: Annotated[int, typer.Option(min=1, help="With --int8: training clips to calibrate on.")] = 300,
    workers: WorkersOption = 0,
) -> None:
    """Export a model to ONNX for onnxruntime and devices: waveform in, logits out, the front end inside.

    Labels, feature settings, the detector and the card go into the file's metadata (key `kws`, the same
    JSON as a checkpoint's), so every command that takes a MODEL also runs the .onnx file. Any batch size.
    """
    from kws.export import export_model

    with console.status("exporting") as status:
        report = export_model(model, out, int8, data, calibration_clips, workers or None, on_step=status.update)
    kind = "float32"
    if report.int8:
        kind = f"int8: {report.quantized_nodes} nodes quantized, calibrated on {report.calibration_clips} clips"
    console.print(
        f"wrote {report.path} ({report.size_bytes / 1e3:.0f} KB, {kind}); checked with onnx.checker; onnxruntime "
        f"float32 against PyTorch: largest logit difference {report.max_logit_difference:.1e}"
    )
