"""The one streaming detector, used by `kws stream` and `kws listen`, and how its detections are scored.

Audio arrives in chunks of any size. Every hop the model scores the last `clip_s` of audio (the
same window it was trained on, through its own front end), posteriors are averaged over a short
smoothing window, and a keyword fires when its smoothed posterior reaches the threshold; after a
detection nothing fires for a refractory time, so one utterance gives one event.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kws.audio import read_blocks
from kws.config import FeatureConfig
from kws.errors import ConfigError, DataError
from kws.models import optimize_for_inference, predict_probabilities


@dataclass(frozen=True)
class DetectorConfig:
    """How posteriors become detections; defaults tuned on the validation stream of the shared data."""

    hop_ms: float = 100.0  # the model scores a new window this often
    smoothing_ms: float = 300.0  # posteriors are averaged over the windows of this span, ending now
    threshold: float = 0.8  # smoothed posterior a keyword must reach
    refractory_s: float = 1.0  # after a detection, nothing fires for this long
    # A keyword that fired fires again only once its smoothed posterior has fallen below its threshold:
    # one word held above it for longer than the refractory time gives one event, not two.
    rearm_below_threshold: bool = True
    # Per-keyword thresholds that replace `threshold` for those keywords: (keyword, threshold) pairs,
    # e.g. calibrated to a target rate of false accepts per hour (kws calibrate).
    keyword_thresholds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not 1.0 <= self.hop_ms <= 1000.0:
            raise ConfigError(f"hop_ms: must be between 1 and 1000 ms (got {self.hop_ms})")
        if self.smoothing_ms < 0:
            raise ConfigError(f"smoothing_ms: must be >= 0 (got {self.smoothing_ms})")
        for name, value in (("threshold", self.threshold), *self.keyword_thresholds):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"threshold of {name}: must be in (0, 1] (got {value})")
        if self.refractory_s < 0:
            raise ConfigError(f"refractory_s: must be >= 0 (got {self.refractory_s})")

    @property
    def smoothing_windows(self) -> int:
        return max(1, round(self.smoothing_ms / self.hop_ms))

    def threshold_of(self, keyword: str) -> float:
        return dict(self.keyword_thresholds).get(keyword, self.threshold)

    def describe(self) -> str:
        """The settings in one line, for people."""
        if self.keyword_thresholds:
            thresholds = "thresholds " + ", ".join(f"{name} {value:.3g}" for name, value in self.keyword_thresholds)
        else:
            thresholds = f"threshold {self.threshold:g}"
        rearm = "" if self.rearm_below_threshold else " (re-armed by time alone)"
        return (
            f"{thresholds}; smoothing {self.smoothing_ms:g} ms, refractory {self.refractory_s:g} s{rearm}, "
            f"hop {self.hop_ms:g} ms"
        )


def detector_config_for(info, **given) -> DetectorConfig:
    """The detector a model runs with: the settings its card stores (`kws calibrate --write`: per-keyword
    thresholds and the smoothing they were calibrated with), else the defaults; `given` values that are
    not None override. A global `threshold` given replaces the stored per-keyword ones."""
    stored = dict((info.card or {}).get("detector", {}).get("settings", {}))
    stored["keyword_thresholds"] = tuple(stored.get("keyword_thresholds", {}).items())
    given = {key: value for key, value in given.items() if value is not None}
    if "threshold" in given:
        stored["keyword_thresholds"] = ()
    return DetectorConfig(**{**stored, **given})


@dataclass(frozen=True)
class Detection:
    """A keyword event. `time_s` is when it fired (the end of the newest window scored), in stream seconds."""

    time_s: float
    keyword: str
    score: float
    # Start of the window (of `clip_s`) in which the keyword's posterior peaked within the smoothing span:
    # where the word was heard best, which may be some windows before the one that made it fire.
    window_start_s: float

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def is_keyword(label: str) -> bool:
    """`_silence_`, `_unknown_` and any other `_name_` label are not keywords: they never fire."""
    return not (label.startswith("_") and label.endswith("_"))


class WindowScorer:
    """Ring buffer + model: push audio chunks, get the posteriors of every window completed, in order.

    Window k covers stream samples [k * hop - window, k * hop); before the stream starts the buffer
    holds silence, so a keyword can fire within the first second. Complete windows are scored in
    batches, so a whole file pushed at once runs as fast as batched inference and gives the same
    posteriors as 100 ms chunks.
    """

    def __init__(
        self, model: nn.Module, features: FeatureConfig, hop_ms: float, device: str | torch.device = "cpu",
        batch_size: int = 32, optimize: bool = True,
    ) -> None:  # fmt: skip
        model = model.eval()
        self.model = optimize_for_inference(model, features.clip_samples) if optimize else model
        self.features = features
        self.sample_rate = features.sample_rate
        self.window = features.clip_samples
        self.hop = max(1, round(hop_ms * self.sample_rate / 1000))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._audio = np.zeros(self.window, dtype=np.float32)  # the last window, then samples not yet scored
        self.windows_scored = 0
        self.samples_pushed = 0

    def push(self, chunk: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Add samples; returns (end times in s, posteriors (windows, classes)) of the windows completed."""
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self.samples_pushed += len(chunk)
        self._audio = np.concatenate([self._audio, chunk])
        ready = (len(self._audio) - self.window) // self.hop
        if ready <= 0:
            return np.zeros(0), torch.zeros(0, 0)
        audio = torch.from_numpy(self._audio[: self.window + ready * self.hop])
        windows = audio[self.hop :].unfold(0, self.window, self.hop)  # windows ending at hop, 2 hop, ...
        posteriors = predict_probabilities(self.model, windows, self.device, self.batch_size)
        first = self.windows_scored + 1
        ends_s = np.arange(first, first + ready) * self.hop / self.sample_rate
        self.windows_scored += ready
        self._audio = self._audio[ready * self.hop :]
        return ends_s, posteriors

    def flush(self) -> tuple[np.ndarray, torch.Tensor]:
        """End of stream: score on, over silence, until the window's centre has passed the last sample."""
        end = self.samples_pushed + self.window // 2
        target_windows = math.ceil(end / self.hop)
        missing = max(0, target_windows - self.windows_scored) * self.hop - (len(self._audio) - self.window)
        samples_pushed = self.samples_pushed
        result = self.push(np.zeros(max(missing, 0), np.float32))
        self.samples_pushed = samples_pushed
        return result


class DetectionPolicy:
    """Smoothing, threshold and refractory time: a sequence of posteriors in, detections out."""

    def __init__(self, labels: tuple[str, ...], config: DetectorConfig, clip_s: float) -> None:
        self.labels = labels
        self.config = config
        self.clip_s = clip_s
        self.keywords = np.array([is_keyword(label) for label in labels])
        if not self.keywords.any():
            raise ConfigError(f"the model has no keywords to detect (labels: {', '.join(labels)})")
        strangers = sorted(set(dict(config.keyword_thresholds)) - {label for label in labels if is_keyword(label)})
        if strangers:
            raise ConfigError(f"thresholds given for {', '.join(strangers)}: not keywords of this model")
        self.thresholds = np.array([config.threshold_of(label) if is_keyword(label) else np.inf for label in labels])
        # The last (smoothing_windows - 1) posterior rows, zeros before the stream; rows seen so far.
        self._recent = np.zeros((config.smoothing_windows - 1, len(labels)))
        self._seen = 0
        self._quiet_until_s = -math.inf
        # Per label, the row (counted from the stream's start) of its last detection, and of the last row
        # its smoothed posterior spent below its threshold: a label is armed when the second is later.
        self._fired_at = np.full(len(labels), -2)
        self._below_at = np.full(len(labels), -1)

    def update(self, ends_s: np.ndarray, posteriors: torch.Tensor | np.ndarray) -> list[Detection]:
        rows = np.asarray(posteriors, dtype=np.float64).reshape(-1, len(self.labels))
        if not len(rows):
            return []
        history = np.concatenate([self._recent, rows])
        # Each smoothed row adds the same values in the same order whatever the chunking, so
        # detections are bit-identical for any chunk size.
        total = np.zeros_like(rows)
        for offset in range(len(self._recent) + 1):
            total += history[offset : offset + len(rows)]
        counts = np.minimum(np.arange(self._seen + 1, self._seen + len(rows) + 1), len(self._recent) + 1)
        smoothed = total / counts[:, None]
        self._recent = history[len(history) - len(self._recent) :]
        row_numbers = np.arange(self._seen, self._seen + len(rows))
        self._seen += len(rows)
        # Of the keywords at or above their own threshold, the most probable fires.
        above = smoothed >= self.thresholds
        scores = np.where(above, smoothed, -1.0)
        best = scores.argmax(axis=1)
        best_scores = scores[np.arange(len(rows)), best]
        below_at = np.maximum(np.maximum.accumulate(np.where(above, -1, row_numbers[:, None]), axis=0), self._below_at)
        detections = []
        for index in np.flatnonzero(best_scores >= 0):
            end_s, label = float(ends_s[index]), best[index]
            armed = below_at[index, label] > self._fired_at[label] or not self.config.rearm_below_threshold
            if end_s >= self._quiet_until_s and armed:
                span = history[index : index + len(self._recent) + 1, label]  # the rows smoothed, oldest first
                peak_end_s = end_s - (len(span) - 1 - int(span.argmax())) * self.config.hop_ms / 1000
                detections.append(Detection(end_s, self.labels[label], float(best_scores[index]),
                                            peak_end_s - self.clip_s))  # fmt: skip
                self._quiet_until_s = end_s + self.config.refractory_s
                self._fired_at[label] = row_numbers[index]
        self._below_at = below_at[-1]
        return detections


class KeywordDetector:
    """The streaming detector: `push(chunk)` and `flush()` return the detections they complete."""

    def __init__(
        self, model: nn.Module, labels: tuple[str, ...], features: FeatureConfig,
        config: DetectorConfig | None = None, device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        config = config or DetectorConfig()
        self.scorer = WindowScorer(model, features, config.hop_ms, device)
        self.policy = DetectionPolicy(labels, config, features.clip_s)
        self.config = config
        self.sample_rate = features.sample_rate

    def push(self, chunk: np.ndarray) -> list[Detection]:
        return self.policy.update(*self.scorer.push(chunk))

    def flush(self) -> list[Detection]:
        return self.policy.update(*self.scorer.flush())


@dataclass(frozen=True)
class FileRun:
    detections: list[Detection]
    duration_s: float  # audio seconds
    seconds: float  # wall-clock seconds spent

    @property
    def real_time_factor(self) -> float:
        return self.seconds / self.duration_s if self.duration_s else math.nan


def detect_in_file(
    detector: KeywordDetector, path: str | os.PathLike, realtime: bool = False,
    on_detection: Callable[[Detection], None] | None = None, on_progress: Callable[[float], None] | None = None,
) -> FileRun:  # fmt: skip
    """Run a recording through the detector block by block; `realtime` paces it as a live microphone would.

    `on_detection` sees each event as soon as it fires; `on_progress` gets seconds of audio done.
    """
    rate = detector.sample_rate
    block_s = detector.config.hop_ms / 1000 if realtime else 10.0
    detections: list[Detection] = []
    started = time.perf_counter()
    samples = 0

    def report(found: list[Detection]) -> None:
        detections.extend(found)
        for detection in found if on_detection else ():
            on_detection(detection)

    for block in read_blocks(path, rate, block_s):
        for start in range(0, len(block), round(block_s * rate)):
            piece = block[start : start + round(block_s * rate)]
            samples += len(piece)
            if realtime:
                time.sleep(max(0.0, samples / rate - (time.perf_counter() - started)))
            report(detector.push(piece))
            if on_progress:
                on_progress(len(piece) / rate)
    report(detector.flush())
    return FileRun(detections, samples / rate, time.perf_counter() - started)


# Scoring detections against the truth of a stream test -------------------------------------------


@dataclass(frozen=True)
class TruthEvent:
    """A word in a test stream: `label` spoken in the clip starting at `time_s` (TensorFlow's convention)."""

    label: str
    time_s: float


def read_truth(path: str | os.PathLike) -> list[TruthEvent]:
    """Rows `label,seconds` (TensorFlow's streaming test format; a header row is allowed), sorted by time."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise DataError(f"{path}: cannot read the truth file ({error.strerror})") from None
    events = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or row[0].startswith("#") or row == ["label", "seconds"]:
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{number}: expected 'label,seconds', got {','.join(row)!r}")
        try:
            time_s = float(row[1])
        except ValueError:
            raise DataError(f"{path}:{number}: {row[1]!r} is not a time in seconds") from None
        events.append(TruthEvent(row[0].strip(), time_s))
    return sorted(events, key=lambda event: event.time_s)


def write_truth(path: str | os.PathLike, events: list[TruthEvent]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        for event in events:
            writer.writerow([event.label, f"{event.time_s:.3f}"])


@dataclass(frozen=True)
class StreamScore:
    """How detections match the truth.

    TensorFlow's streaming figures (as percentages of the keyword occurrences): `matched` (any
    detection near it), `correct` (the right keyword), `wrong` (another keyword, or a second
    detection of one already matched), `false_positives` (detections near no keyword). Words that are
    not keywords of the model are negatives: a detection near one is a false positive.
    """

    keywords_spoken: int
    correct: int
    wrong: int
    false_positives: int
    duration_s: float

    @property
    def hit_rate(self) -> float:
        return self.correct / self.keywords_spoken if self.keywords_spoken else math.nan

    @property
    def false_accepts(self) -> int:
        return self.wrong + self.false_positives

    @property
    def false_accepts_per_hour(self) -> float:
        return self.false_accepts / (self.duration_s / 3600) if self.duration_s else math.nan

    def percentages(self) -> dict[str, float]:
        spoken = max(self.keywords_spoken, 1)
        return {
            "matched": 100 * (self.correct + self.wrong) / spoken,
            "correct": 100 * self.correct / spoken,
            "wrong": 100 * self.wrong / spoken,
            "false_positives": 100 * self.false_positives / spoken,
        }

    def to_dict(self) -> dict:
        return {
            "keywords_spoken": self.keywords_spoken, "correct": self.correct, "wrong": self.wrong,
            "false_positives": self.false_positives, "duration_s": round(self.duration_s, 3),
            "hit_rate": self.hit_rate, "false_accepts_per_hour": self.false_accepts_per_hour,
            "percentages": self.percentages(),
        }  # fmt: skip


def score_detections(
    detections: list[Detection], truth: list[TruthEvent], keywords: tuple[str, ...], duration_s: float,
    tolerance_s: float = 0.75,
) -> StreamScore:  # fmt: skip
    """Match detections to keyword occurrences as TensorFlow's test_streaming_accuracy does.

    A detection is compared by the start of its window with the truth time (a clip's start); the
    first keyword occurrence within `tolerance_s` decides: correct if it has the same label and was not
    matched before, wrong otherwise; none within tolerance: a false positive.
    """
    spoken = [event for event in truth if event.label in keywords]
    matched: set[int] = set()
    correct = wrong = false_positives = 0
    for detection in detections:
        near = [
            index for index, event in enumerate(spoken)
            if abs(event.time_s - detection.window_start_s) <= tolerance_s
        ]  # fmt: skip
        if not near:
            false_positives += 1
            continue
        index = near[0]
        if spoken[index].label == detection.keyword and index not in matched:
            correct += 1
        else:
            wrong += 1
        matched.add(index)
    return StreamScore(len(spoken), correct, wrong, false_positives, duration_s)
