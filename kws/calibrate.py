"""False accepts on continuous speech: long streams scored once, detection thresholds swept over the
posteriors, per-keyword thresholds calibrated to a target rate of false accepts per hour, DET curves.

A keyword stream (`make_stream_test`) says how many keywords are found; a negative stream
(`make_negative_stream`: speech in which no keyword is said) says how often the detector fires anyway.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kws.audio import read_blocks
from kws.checkpoint import ModelInfo
from kws.config import DataConfig, expand_path
from kws.data import NOISE_FOLDER
from kws.stream import (
    DetectionPolicy,
    DetectorConfig,
    TruthEvent,
    WindowScorer,
    is_keyword,
    read_truth,
    score_detections,
)
from kws.stream_test import make_negative_stream, make_stream_test

# Thresholds tried when sweeping and calibrating: even steps of the log-odds from 0.5 to 0.9999, where
# the tail of false accepts lives.
SWEEP_THRESHOLDS = tuple(float(1 / (1 + math.exp(-x))) for x in np.arange(0.0, 9.25, 0.1))
# The same steps from 0.05: a model of one keyword against everything else can fire below 0.5 and stay quiet.
LOW_SWEEP_THRESHOLDS = tuple(float(1 / (1 + math.exp(-x))) for x in np.arange(-3.0, 9.25, 0.1))


@dataclass(frozen=True)
class ScoredStream:
    """A stream's posteriors, one row per window (ending at `ends_s`), with its truth."""

    name: str
    ends_s: np.ndarray
    posteriors: np.ndarray  # (windows, classes)
    duration_s: float
    truth: tuple[TruthEvent, ...]

    @property
    def hours(self) -> float:
        return self.duration_s / 3600


def score_stream(
    model: nn.Module, info: ModelInfo, path: str | os.PathLike, hop_ms: float = DetectorConfig.hop_ms,
    device: str | torch.device = "cpu",
) -> ScoredStream:  # fmt: skip
    """Every window of a stream test (a .wav with its .csv truth beside it) through the model, once."""
    path = Path(path)
    scorer = WindowScorer(model, info.features, hop_ms, device, batch_size=256)
    ends, posteriors = [], []
    for block in read_blocks(path, info.features.sample_rate):
        found = scorer.push(block)
        ends.append(found[0])
        posteriors.append(np.asarray(found[1], dtype=np.float32).reshape(len(found[0]), -1))
    samples = scorer.samples_pushed
    found = scorer.flush()
    ends.append(found[0])
    posteriors.append(np.asarray(found[1], dtype=np.float32).reshape(len(found[0]), -1))
    return ScoredStream(path.stem, np.concatenate(ends), np.concatenate(posteriors),
                        samples / info.features.sample_rate, tuple(read_truth(path.with_suffix(".csv"))))  # fmt: skip


def detect(stream: ScoredStream, labels: tuple[str, ...], clip_s: float, config: DetectorConfig) -> list:
    return DetectionPolicy(labels, config, clip_s).update(stream.ends_s, stream.posteriors)


def poisson_interval(count: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) confidence interval of a Poisson mean from an observed `count` of events."""
    from scipy.stats import chi2

    tail = (1 - confidence) / 2
    low = 0.0 if count == 0 else float(chi2.ppf(tail, 2 * count) / 2)
    return low, float(chi2.ppf(1 - tail, 2 * count + 2) / 2)


@dataclass(frozen=True)
class OperatingPoint:
    """One detector setting on a keyword stream and a negative stream."""

    config: DetectorConfig
    keywords_spoken: int
    hits: int  # keywords found, with the right label
    false_accepts: int  # detections on the negative stream
    false_accepts_by_keyword: dict[str, int]
    negative_hours: float
    keyword_stream_false_accepts: int  # wrong keywords and detections of other words in the keyword stream
    hits_by_keyword: dict[str, tuple[int, int]]  # keyword -> (found, spoken)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.keywords_spoken if self.keywords_spoken else math.nan

    @property
    def false_accepts_per_hour(self) -> float:
        return self.false_accepts / self.negative_hours

    def interval_per_hour(self, confidence: float = 0.95) -> tuple[float, float]:
        low, high = poisson_interval(self.false_accepts, confidence)
        return low / self.negative_hours, high / self.negative_hours

    def to_dict(self) -> dict:
        low, high = self.interval_per_hour()
        return {
            "keywords_spoken": self.keywords_spoken, "hits": self.hits, "hit_rate": round(self.hit_rate, 4),
            "false_accepts": self.false_accepts, "negative_hours": round(self.negative_hours, 3),
            "false_accepts_per_hour": round(self.false_accepts_per_hour, 3),
            "false_accepts_per_hour_95": [round(low, 3), round(high, 3)],
            "false_accepts_by_keyword": self.false_accepts_by_keyword,
            "keyword_stream_false_accepts": self.keyword_stream_false_accepts,
        }  # fmt: skip


def operating_point(
    keyword_stream: ScoredStream, negative_stream: ScoredStream, labels: tuple[str, ...], clip_s: float,
    config: DetectorConfig,
) -> OperatingPoint:  # fmt: skip
    keywords = tuple(label for label in labels if is_keyword(label))
    found = detect(keyword_stream, labels, clip_s, config)
    score = score_detections(found, list(keyword_stream.truth), keywords, keyword_stream.duration_s)
    false = Counter(detection.keyword for detection in detect(negative_stream, labels, clip_s, config))
    return OperatingPoint(
        config, score.keywords_spoken, score.correct, sum(false.values()),
        {keyword: false[keyword] for keyword in keywords}, negative_stream.hours, score.false_accepts,
        _hits_by_keyword(found, keyword_stream.truth, keywords),
    )  # fmt: skip


def _hits_by_keyword(detections: list, truth: tuple[TruthEvent, ...], keywords: tuple[str, ...]) -> dict:
    result = {}
    for keyword in keywords:
        spoken = [event for event in truth if event.label == keyword]
        mine = [detection for detection in detections if detection.keyword == keyword]
        result[keyword] = (score_detections(mine, spoken, (keyword,), 1.0).correct, len(spoken))
    return result


def sweep(
    keyword_stream: ScoredStream, negative_stream: ScoredStream, labels: tuple[str, ...], clip_s: float,
    config: DetectorConfig, thresholds: tuple[float, ...] = SWEEP_THRESHOLDS,
) -> list[OperatingPoint]:  # fmt: skip
    """One global threshold at a time (no per-keyword thresholds), the other settings as in `config`."""
    configs = [replace(config, threshold=threshold, keyword_thresholds=()) for threshold in thresholds]
    return [operating_point(keyword_stream, negative_stream, labels, clip_s, each) for each in configs]


def best_at(points: list[OperatingPoint], per_hour: float) -> OperatingPoint | None:
    """The point with the most hits among those at or below `per_hour` false accepts per hour."""
    allowed = [point for point in points if point.false_accepts_per_hour <= per_hour]
    return max(allowed, key=lambda point: (point.hits, -point.config.threshold)) if allowed else None


def keyword_counts(
    stream: ScoredStream, labels: tuple[str, ...], clip_s: float, config: DetectorConfig, keyword: str,
    thresholds: tuple[float, ...] = SWEEP_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(hits, false accepts) of `keyword` alone (the other keywords' posteriors zeroed) at each threshold.

    A hit is a first detection of a `keyword` in the stream's truth, within its tolerance; every other
    detection (on another word, on speech without keywords, a second one) is a false accept.
    """
    silenced = np.array([is_keyword(label) and label != keyword for label in labels])
    alone = replace(stream, posteriors=np.where(silenced, 0.0, stream.posteriors))
    spoken = [event for event in stream.truth if event.label == keyword]
    hits, false = [], []
    for threshold in thresholds:
        found = detect(alone, labels, clip_s, replace(config, threshold=threshold, keyword_thresholds=()))
        correct = score_detections(found, spoken, (keyword,), stream.duration_s).correct
        hits.append(correct)
        false.append(len(found) - correct)
    return np.array(hits), np.array(false)


def calibrate_thresholds(
    streams: list[ScoredStream], labels: tuple[str, ...], clip_s: float, config: DetectorConfig,
    target_per_hour: float, thresholds: tuple[float, ...] = SWEEP_THRESHOLDS,
) -> dict[str, float]:  # fmt: skip
    """A threshold per keyword: the most hits over the streams for at most `target_per_hour` false accepts
    an hour over all of them (speech without keywords, and the other words of a keyword stream).

    Each keyword starts at the lowest threshold at which it never fires wrongly on the streams; then the
    events the target allows (target x hours, rounded down) are spent greedily where they buy the most
    hits per false accept. Each keyword is counted alone, so a threshold is the keyword's own.
    """
    keywords = [label for label in labels if is_keyword(label)]
    budget = math.floor(target_per_hour * sum(stream.hours for stream in streams) + 1e-9)
    counts = {}
    for keyword in keywords:
        per_stream = [keyword_counts(stream, labels, clip_s, config, keyword, thresholds) for stream in streams]
        counts[keyword] = (sum(hits for hits, _ in per_stream), sum(false for _, false in per_stream))
    chosen = {}
    for keyword, (_, false) in counts.items():
        quiet = np.flatnonzero(np.cumsum(false[::-1]) == 0)  # from the top: thresholds with none above either
        chosen[keyword] = len(thresholds) - 1 - quiet[-1] if len(quiet) else len(thresholds) - 1
    while budget > 0:
        best = None
        for keyword, (hits, false) in counts.items():
            now = chosen[keyword]
            for index in range(now - 1, -1, -1):  # from the top, so a tie keeps the higher threshold
                cost = false[index] - false[now]
                gain = hits[index] - hits[now]
                if 0 < cost <= budget and gain > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, keyword, index, cost)
        if best is None:
            break
        _, keyword, index, cost = best
        chosen[keyword], budget = index, budget - cost
    return {keyword: round(thresholds[index], 5) for keyword, index in chosen.items()}


def calibrate_global_threshold(
    streams: list[ScoredStream], labels: tuple[str, ...], clip_s: float, config: DetectorConfig,
    target_per_hour: float, thresholds: tuple[float, ...] = SWEEP_THRESHOLDS,
) -> float:  # fmt: skip
    """One threshold for every keyword: the lowest at which the wrong firings over the streams (every
    detection that is not the first of a spoken keyword) stay within `target_per_hour` over all of them.

    Fewer numbers fitted to the same hours of speech than one threshold per keyword, so it carries over
    to speech the streams do not hold with less surprise.
    """
    keywords = tuple(label for label in labels if is_keyword(label))
    budget = math.floor(target_per_hour * sum(stream.hours for stream in streams) + 1e-9)
    for threshold in sorted(thresholds):
        each = replace(config, threshold=threshold, keyword_thresholds=())
        wrong = 0
        for stream in streams:
            found = detect(stream, labels, clip_s, each)
            wrong += len(found) - score_detections(found, list(stream.truth), keywords, stream.duration_s).correct
        if wrong <= budget:
            return round(threshold, 5)
    return round(max(thresholds), 5)


def make_streams(
    data: str | os.PathLike, negatives: str | os.PathLike, folder: str | os.PathLike, split: str,
    sample_rate: int, repeats: int = 4, workers: int | None = None, negative_split: str | None = None,
    config: DataConfig | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """A split's keyword stream (every clip of `data`'s split) and negative stream (`negatives`' split, or
    `negative_split`, `repeats` times over `data`'s background noise: its `_background_noise_` folder,
    else `config.noise_dir`), made in `folder` unless already there. `config` says how `data` is read
    (e.g. a manifest's noise)."""
    data, folder = expand_path(data), Path(folder)
    keywords = folder / f"keywords_{split}_{sample_rate}.wav"
    negative_split = negative_split or split
    negative = folder / f"negatives_{negative_split}_x{repeats}_{sample_rate}.wav"
    if not keywords.with_suffix(".csv").exists():
        make_stream_test(data, keywords, config, split=split, sample_rate=sample_rate, workers=workers)
    if not negative.with_suffix(".csv").exists():
        noise = data / NOISE_FOLDER if (data / NOISE_FOLDER).is_dir() else None
        noise = str(noise) if noise else config.noise_dir if config else None
        make_negative_stream(negatives, negative, DataConfig(noise_dir=noise), negative_split, sample_rate, repeats,
                             workers=workers)  # fmt: skip
    return keywords, negative


def calibrate_model(
    model: nn.Module, info: ModelInfo, keyword_path: Path, negative_path: Path, target_per_hour: float,
    base: DetectorConfig | None = None, thresholds: tuple[float, ...] = SWEEP_THRESHOLDS, per_keyword: bool = True,
) -> tuple[DetectorConfig, OperatingPoint]:  # fmt: skip
    """A threshold per keyword (or, not `per_keyword`, one for all; among `thresholds`) for `target_per_hour`
    wrong firings over both streams, and how it does on them."""
    base = replace(base or DetectorConfig(), keyword_thresholds=())
    keyword_stream = score_stream(model, info, keyword_path, base.hop_ms)
    negative_stream = score_stream(model, info, negative_path, base.hop_ms)
    streams, clip_s = [negative_stream, keyword_stream], info.features.clip_s
    if per_keyword:
        chosen = calibrate_thresholds(streams, info.labels, clip_s, base, target_per_hour, thresholds)
        calibrated = replace(base, keyword_thresholds=tuple(chosen.items()))
    else:
        threshold = calibrate_global_threshold(streams, info.labels, clip_s, base, target_per_hour, thresholds)
        calibrated = replace(base, threshold=threshold)
    return calibrated, operating_point(keyword_stream, negative_stream, info.labels, info.features.clip_s, calibrated)


def detector_card(config: DetectorConfig, target_per_hour: float, point: OperatingPoint, streams: dict) -> dict:
    """The `detector` part of a model card: the settings stream and listen use, and where they came from."""
    return {
        "settings": {
            "hop_ms": config.hop_ms, "smoothing_ms": config.smoothing_ms, "refractory_s": config.refractory_s,
            "rearm_below_threshold": config.rearm_below_threshold,
            "threshold": config.threshold, "keyword_thresholds": dict(config.keyword_thresholds),
        },
        "target_false_accepts_per_hour": target_per_hour,
        "calibrated_on": {**streams, **point.to_dict()},
    }  # fmt: skip
