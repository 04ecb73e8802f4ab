"""Hard-negative mining: the audio that made the detector fire, saved as clips to train on as `_unknown_`.

`DetectionSaver` wraps a `KeywordDetector` wherever it runs (`kws stream`, `kws listen`) and writes
what each detection heard; `mine_recordings` runs it over recordings in which no keyword is said, so
that every detection is a false accept, and keeps a folder that training reads as `data.extra_unknown`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import soundfile
from rich.table import Table
from torch import nn

from kws.classify import find_audio_files
from kws.config import DataConfig, FeatureConfig
from kws.data import load_dataset
from kws.errors import AudioError, DataError
from kws.models import optimize_for_inference
from kws.stream import Detection, DetectorConfig, KeywordDetector, detect_in_file, is_keyword

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
MINED_FILE = "mined.jsonl"  # one line per saved window, for the recordings finished
DONE_FILE = ".done"  # one line per recording finished, appended after its windows' lines
SETTINGS_FILE = "mining.json"  # the model and detector settings every window in the folder was mined with
_UNSAFE = re.compile(r"[^\w.-]+")  # characters a saved window's name does not take from its recording's


class RecentAudio:
    """The newest samples of a stream: the last `keep_samples` before the latest chunk, and that chunk.

    A detection fires on a window ending in the chunk just pushed (or, at the end of the stream, on
    silence after it), so a window of up to `keep_samples` can always be cut out.
    """

    def __init__(self, keep_samples: int) -> None:
        self.keep_samples = keep_samples
        self._audio = np.zeros(0, np.float32)
        self.samples_pushed = 0

    def push(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._audio = np.concatenate([self._audio[max(0, len(self._audio) - self.keep_samples) :], chunk])
        self.samples_pushed += len(chunk)

    def cut(self, start: int, stop: int) -> np.ndarray:
        """Stream samples [start, stop): silence before the stream's first sample and after its newest."""
        held_from = self.samples_pushed - len(self._audio)
        if max(start, 0) < held_from:
            raise ValueError(f"samples from {start} are gone: only those from {held_from} are kept")
        window = np.zeros(stop - start, np.float32)
        first, last = max(start, held_from), min(stop, self.samples_pushed)
        if first < last:
            window[first - start : last - start] = self._audio[first - held_from : last - held_from]
        return window


def source_id(path: str | os.PathLike) -> str:
    """The "speaker" of the windows cut from a recording: its name and a hash of its full path.

    Training's split rule hashes what comes before `_nohash_`, so every window of a recording (and of a
    Speech Commands-style `<speaker>_nohash_<n>` recording, every window of that speaker) shares a split.
    """
    path = Path(path)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('-', path.stem)}-{digest}"


class DetectionSaver:
    """A `KeywordDetector` that also writes what each detection heard; use it wherever the detector goes.

    Each window (`clip_s` from `detection.window_start_s`, silence outside the stream) becomes
    `out_dir/<keyword>/<speaker>_nohash_<ms fired, 8 digits>.wav`, 16-bit at the model's rate, written
    under a temporary name and renamed, so an interrupted write leaves no half-written file behind.
    """

    def __init__(self, detector: KeywordDetector, out_dir: str | os.PathLike, speaker: str) -> None:
        self.detector = detector
        self.out_dir = Path(out_dir)
        self.speaker = speaker  # the name before `_nohash_`: `source_id(path)` for a recording
        self.sample_rate = detector.sample_rate
        self.config = detector.config
        # The window that peaked may end up to a smoothing span before the one that fired.
        self.window = detector.scorer.window
        self.audio = RecentAudio(self.window + detector.config.smoothing_windows * detector.scorer.hop)
        self.saved: list[Path] = []

    def push(self, chunk: np.ndarray) -> list[Detection]:
        self.audio.push(chunk)
        return self._save(self.detector.push(chunk))

    def flush(self) -> list[Detection]:
        return self._save(self.detector.flush())

    def path_for(self, detection: Detection) -> Path:
        milliseconds = round(detection.time_s * 1000)
        return self.out_dir / detection.keyword / f"{self.speaker}_nohash_{milliseconds:08d}.wav"

    def window_of(self, detection: Detection) -> np.ndarray:
        rate = self.sample_rate
        start = round(detection.window_start_s * rate)
        return self.audio.cut(start, start + self.window)

    def discard(self) -> None:
        """Remove the windows saved so far (of a recording that could not be read to its end)."""
        for path in self.saved:
            path.unlink(missing_ok=True)
        self.saved = []

    def _save(self, detections: list[Detection]) -> list[Detection]:
        for detection in detections:
            path = self.path_for(detection)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
            try:
                window = np.clip(self.window_of(detection), -1.0, 1.0)
                soundfile.write(str(partial), window, self.sample_rate, subtype="PCM_16", format="WAV")
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            self.saved.append(path)
        return detections


def find_recordings(
    paths: Sequence[str | os.PathLike], split: str | None = None, data: DataConfig | None = None
) -> list[Path]:
    """The recordings to mine, in order: files, folders' audio files (recursively) and manifests' rows.

    A manifest (.csv, .jsonl) is read as `kws dataset` reads it (`data` says how rows without a split
    column are split); `split` keeps only that split's rows. Missing files are kept, to be reported.
    """
    data = replace((data or DataConfig()).own_recordings(), layout="manifest", words=(), unknown=True,
                   silence_fraction=0.0)  # fmt: skip
    found: list[Path] = []
    for path in map(Path, paths):
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            rows = [clip for clip in load_dataset(data, path).clips if split is None or clip.split == split]
            if not rows:
                raise DataError(f"{path}: no rows in the {split} split")
            found += [clip.path for clip in rows]
        else:
            found += find_audio_files([path])
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class MinedWindow:
    """A saved window: where it came from, when and why the detector fired, and where it lies in the folder."""

    source: str  # the recording, as an absolute path
    time_s: float
    window_start_s: float
    keyword: str
    score: float
    path: str  # relative to the mined folder

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class MiningReport:
    """The false accepts on the recordings asked for, those mined now and those a previous run finished."""

    out_dir: Path
    keywords: tuple[str, ...]
    windows: tuple[MinedWindow, ...]
    recordings: int  # mined, now or before
    duration_s: float  # their audio
    mined_now: int
    already_done: int  # finished by a previous run: skipped
    failed: tuple[str, ...]  # one line per recording that could not be read, naming it
    seconds: float  # wall-clock time of this run

    def false_accepts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.keywords, 0)
        for window in self.windows:
            counts[window.keyword] = counts.get(window.keyword, 0) + 1
        return counts

    def per_hour(self, count: int) -> float:
        return count / (self.duration_s / 3600) if self.duration_s else float("nan")


def mine_recordings(
    model: nn.Module, labels: tuple[str, ...], features: FeatureConfig, recordings: Sequence[Path],
    out_dir: str | os.PathLike, config: DetectorConfig | None = None, device: str = "cpu", model_name: str = "",
    on_recording: Callable[[Path], None] | None = None, on_skip: Callable[[str], None] | None = None,
) -> MiningReport:  # fmt: skip
    """Run the detector over each recording on its own and save every detection's window in `out_dir`.

    The recordings should hold no keyword, so each detection is a false accept. Resumable: a recording's
    lines go to `mined.jsonl` and then to `.done` once it is read to its end, and recordings in `.done`
    are skipped, so a killed run continues where it stopped (its half-mined recording is mined again).
    A folder mined with another model or other detector settings is refused. Unreadable recordings
    are reported through `on_skip` and the rest go on; `on_recording` follows each one.
    """
    started = time.perf_counter()
    config = config or DetectorConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir, {"model": model_name, "labels": list(labels), "detector": asdict(config)})
    durations = {line["source"]: line["duration_s"] for line in _read_lines(out_dir / DONE_FILE)}
    windows = _forget_unfinished(out_dir, set(durations))
    # Traced once here; the detector each recording gets finds the frozen copy and keeps it as it is.
    frozen = optimize_for_inference(model.eval(), features.clip_samples)
    asked: dict[str, None] = {}  # the recordings mined, now or before, in order
    mined_now = already_done = 0
    failed = []
    for path in recordings:
        source = str(Path(path).resolve())
        if source in durations:
            already_done += 1
            asked[source] = None
        else:
            detector = KeywordDetector(frozen, labels, features, config, device)
            try:
                found, durations[source] = _mine_one(DetectionSaver(detector, out_dir, source_id(path)), path)
                windows += found
                mined_now += 1
                asked[source] = None
            except AudioError as error:
                failed.append(str(error))
                if on_skip:
                    on_skip(str(error))
        if on_recording:
            on_recording(Path(path))
    return MiningReport(
        out_dir, tuple(label for label in labels if is_keyword(label)),
        tuple(window for window in windows if window.source in asked), len(asked),
        sum(durations[source] for source in asked), mined_now, already_done, tuple(failed),
        time.perf_counter() - started,
    )  # fmt: skip


def _mine_one(saver: DetectionSaver, path: Path) -> tuple[list[MinedWindow], float]:
    """Mine one recording to its end, then record it as done; (its windows, its duration in s)."""
    source = str(Path(path).resolve())
    try:
        run = detect_in_file(saver, path)
    except BaseException:
        saver.discard()
        raise
    windows = [
        MinedWindow(source, detection.time_s, detection.window_start_s, detection.keyword, detection.score,
                    saved.relative_to(saver.out_dir).as_posix())
        for detection, saved in zip(run.detections, saver.saved)
    ]  # fmt: skip
    _append_lines(saver.out_dir / MINED_FILE, [window.to_dict() for window in windows])
    _append_lines(saver.out_dir / DONE_FILE, [{"source": source, "duration_s": run.duration_s}])
    return windows, run.duration_s


def mining_table(report: MiningReport) -> Table:
    """Per keyword: false accepts and false accepts per hour; then all keywords together."""
    minutes = report.duration_s / 60
    table = Table(title=f"false accepts in {report.recordings} recording(s), {minutes:.1f} min", title_justify="left")
    table.add_column("keyword")
    table.add_column("false accepts", justify="right")
    table.add_column("per hour", justify="right")
    counts = report.false_accepts()
    for keyword, count in counts.items():
        table.add_row(keyword, str(count), f"{report.per_hour(count):.1f}")
    table.add_section()
    total = sum(counts.values())
    table.add_row("all", str(total), f"{report.per_hour(total):.1f}", style="bold")
    return table


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Every window in a folder comes from one model and detector: a rerun with others is refused."""
    path = out_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            changed = ", ".join(key for key in settings if stored.get(key) != settings[key])
            raise DataError(
                f"{out_dir}: mined before with another {changed or 'setting'} ({path}); "
                "use another folder, or the same settings to continue"
            )
        return
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read_lines(path: Path) -> list[dict]:
    """The JSON lines of a file; a line cut short by a killed run is left out."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def _append_lines(path: Path, lines: list[dict]) -> None:
    if lines:
        with path.open("a") as handle:
            handle.write("".join(json.dumps(line) + "\n" for line in lines))


def _forget_unfinished(out_dir: Path, finished: set[str]) -> list[MinedWindow]:
    """The windows of finished recordings; those of a recording a killed run left half-done are removed."""
    path = out_dir / MINED_FILE
    windows = [MinedWindow(**line) for line in _read_lines(path)]
    kept = [window for window in windows if window.source in finished]
    if len(kept) < len(windows):
        for window in windows:
            if window.source not in finished:
                (out_dir / window.path).unlink(missing_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            partial.write_text("".join(json.dumps(window.to_dict()) + "\n" for window in kept))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return kept
