"""Model cards: what a model is, how it was made, and how well it does, measured and stored in its file.

A card is a plain dict in the checkpoint's description (`ModelInfo.card`). `kws train` writes its
`training` part; `kws card MODEL --data DATA --write` measures the rest on the data's testing split:
accuracy and per-class recall, hits and false accepts per hour on a stream test of the testing
speakers, multiply-accumulates (MACs) per window and per second of streaming audio, and CPU latency.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kws.calibrate import make_streams, operating_point, score_stream
from kws.checkpoint import ModelInfo, load_model, read_info, resolve_model_path, rewrite_info
from kws.data import SILENCE, DataConfig, load_dataset
from kws.evaluate import dataset_config_for, evaluate_dataset
from kws.models import count_parameters, optimize_for_inference
from kws.settings import build
from kws.stream import (
    DetectorConfig,
    KeywordDetector,
    detect_in_file,
    detector_config_for,
    is_keyword,
    read_truth,
    score_detections,
)
from kws.stream_test import make_stream_test

CARD_SPLIT = "testing"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def count_macs(model: nn.Module, num_samples: int) -> int:
    """Multiply-accumulates for one window: convolutions and matrix products (the mel projection
    included; the FFT is not counted), as torch's FlopCounterMode counts them, halved."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, num_samples))
    return counter.get_total_flops() // 2


def cpu_latency_ms(model: nn.Module, num_samples: int, runs: int = 200) -> dict:
    """Milliseconds per single-window inference on 1 CPU thread, the frozen inference copy, after warm-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast = optimize_for_inference(model.cpu().eval(), num_samples)
        window = torch.randn(1, num_samples) * 0.05
        times = []
        with torch.no_grad():
            for run in range(runs + 20):
                started = time.perf_counter()
                fast(window)
                if run >= 20:
                    times.append(1000 * (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    return {
        "median": round(statistics.median(times), 3),
        "p90": round(float(np.percentile(times, 90)), 3),
        "threads": 1,
        "cpu": cpu_model(),
    }


def data_config(info: ModelInfo) -> DataConfig:
    """The data settings a model was trained with, reading its labels (the path comes separately)."""
    return build(DataConfig, dataset_config_for(info.recipe, info.labels), "data")


def measure_card(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    stream: str | os.PathLike | None = None,
    workers: int | None = None,
    on_step: Callable[[str], None] | None = None,
    negatives: str | os.PathLike | None = None,
) -> dict:
    """A model's card, measured on `data`'s testing split (and `stream`, a stream test with .csv beside it;
    made from the testing split when not given), with the model's own detector; with `negatives` (speech
    without keywords), also false accepts per hour on a stream of their testing split. The stored
    `training` and `detector` parts are kept."""
    step = on_step or (lambda text: None)
    data = Path(data)
    model, info = load_model(model_path)
    config = data_config(info)
    samples = info.features.clip_samples
    detector_config = detector_config_for(info)
    card: dict = {
        "measured": date.today().isoformat(),
        "training": info.card.get("training", {}),
        **({"detector": info.card["detector"]} if "detector" in info.card else {}),
        "parameters": count_parameters(model),
        "size_bytes": resolve_model_path(model_path).stat().st_size,
        "labels": list(info.labels),
    }
    step("counting multiply-accumulates and timing one window on 1 thread")
    macs = count_macs(model, samples)
    card["macs"] = {
        "per_window": macs,
        "window_s": info.features.clip_s,
        "per_second_streaming": round(macs * 1000 / detector_config.hop_ms),
        "hop_ms": detector_config.hop_ms,
    }
    card["cpu_latency_ms"] = cpu_latency_ms(model, samples)

    step(f"scoring the {CARD_SPLIT} split of {data}")
    dataset = load_dataset(config, data)
    clips = dataset.split(CARD_SPLIT)
    report, skipped = evaluate_dataset(model, info.labels, clips, info.features, workers=workers)
    card["test"] = {
        "data": str(data),
        "split": CARD_SPLIT,
        "clips": int(report.support.sum()),
        "speakers": len({clip.speaker for clip in clips if clip.label != SILENCE}),
        "skipped": len(skipped),
        "accuracy": round(report.accuracy, 5),
        "recall": {label: round(float(value), 4) for label, value in zip(info.labels, report.recall)},
    }

    with tempfile.TemporaryDirectory(prefix="kws-card-") as folder:
        negative_path = None
        if negatives is not None:
            step(f"making streams of the {CARD_SPLIT} speakers and of the {CARD_SPLIT} split of {negatives}")
            keyword_path, negative_path = make_streams(data, negatives, folder, CARD_SPLIT, info.features.sample_rate,
                                                       workers=workers, config=config)  # fmt: skip
            stream = stream or keyword_path
        if stream is None:
            step(f"making a stream test of the {CARD_SPLIT} speakers")
            stream = make_stream_test(data, Path(folder) / "stream.wav", config, CARD_SPLIT,
                                      info.features.sample_rate, workers=workers).wav  # fmt: skip
        step(f"running the streaming detector over {stream}")
        card["stream"] = stream_figures(model, info, Path(stream), detector_config)
        if negative_path is not None:
            step("counting false accepts on speech without keywords")
            point = operating_point(score_stream(model, info, stream, detector_config.hop_ms),
                                    score_stream(model, info, negative_path, detector_config.hop_ms),
                                    info.labels, info.features.clip_s, detector_config)  # fmt: skip
            card["false_accepts"] = {"negatives": str(negatives), "split": CARD_SPLIT, **point.to_dict()}
    return card


def stream_figures(model: nn.Module, info: ModelInfo, stream: Path, config: DetectorConfig) -> dict:
    truth = read_truth(stream.with_suffix(".csv"))
    detector = KeywordDetector(model, info.labels, info.features, config)
    run = detect_in_file(detector, stream)
    keywords = tuple(label for label in info.labels if is_keyword(label))
    score = score_detections(run.detections, truth, keywords, run.duration_s)
    return {
        "file": stream.name,
        "minutes": round(run.duration_s / 60, 2),
        "keywords_spoken": score.keywords_spoken,
        "other_words": sum(event.label not in keywords for event in truth),
        "threshold": config.threshold if not config.keyword_thresholds else "calibrated",
        "hit_rate": round(score.hit_rate, 4),
        "false_accepts": score.false_accepts,
        "false_accepts_per_hour": round(score.false_accepts_per_hour, 2),
    }


def write_card(model_path: str | os.PathLike, card: dict) -> None:
    info = read_info(model_path)
    rewrite_info(model_path, replace(info, card=card))


def card_lines(name: str, info: ModelInfo) -> list[str]:
    """The card as lines of text, for `kws card`."""
    card = info.card
    lines = [f"{name}: {info.architecture}, labels {', '.join(info.labels)}"]
    training = card.get("training", {})
    if training:
        made = f"trained with `{training['command']}`" if "command" in training else "trained"
        details = [f"{key} {training[key]}" for key in ("seed", "epochs", "best_epoch") if key in training]
        if "minutes" in training:
            details.append(f"{training['minutes']:.0f} min on {training.get('where', 'this machine')}")
        lines.append(f"  {made}" + (f" ({', '.join(details)})" if details else ""))
    if "parameters" in card:
        lines.append(f"  {card['parameters']:,} parameters, {card['size_bytes'] / 1e6:.2f} MB on disk")
    if "macs" in card:
        macs = card["macs"]
        lines.append(
            f"  {macs['per_window'] / 1e6:.1f} M multiply-accumulates per {macs['window_s']:g} s window; "
            f"{macs['per_second_streaming'] / 1e6:.0f} M per second of audio when streaming "
            f"(a window every {macs['hop_ms']:g} ms)"
        )
    if "cpu_latency_ms" in card:
        latency = card["cpu_latency_ms"]
        lines.append(
            f"  CPU latency per window: {latency['median']:.2f} ms median, {latency['p90']:.2f} ms p90 "
            f"(1 thread, {latency['cpu']})"
        )
    if "test" in card:
        test = card["test"]
        speakers = f"{test['speakers']} speaker" + ("s" if test["speakers"] != 1 else "")
        lines.append(
            f"  {test['split']} split of {Path(test['data']).name}: {100 * test['accuracy']:.2f}% accuracy on "
            f"{test['clips']:,} clips from {speakers} never trained on"
        )
        lines.append("  recall: " + ", ".join(f"{label} {100 * value:.1f}" for label, value in test["recall"].items()))
    if "stream" in card:
        stream = card["stream"]
        lines.append(
            f"  streaming, {stream['minutes']:.1f} min of the {CARD_SPLIT} speakers ({stream['keywords_spoken']} "
            f"keywords, {stream['other_words']} other words): {100 * stream['hit_rate']:.1f}% hits, "
            f"{stream['false_accepts_per_hour']:.1f} false accepts per hour at {_threshold_words(stream['threshold'])}"
        )
    if "false_accepts" in card:
        fa = card["false_accepts"]
        low, high = fa["false_accepts_per_hour_95"]
        lines.append(
            f"  continuous speech without keywords ({fa['negative_hours']:.2f} h, {fa['split']} split of "
            f"{Path(fa['negatives']).parent.name}): {fa['false_accepts']} false accepts, "
            f"{fa['false_accepts_per_hour']:.2f} per hour (95% interval {low:.2f}-{high:.2f}); keyword stream hits "
            f"{100 * fa['hit_rate']:.1f}%"
        )
    if "detector" in card:
        detector = card["detector"]
        thresholds = detector["settings"]["keyword_thresholds"]
        target = detector["target_false_accepts_per_hour"]
        lines.append(
            f"  detector: thresholds calibrated to {target:g} false accept(s) an hour "
            f"on the {detector['calibrated_on']['split']} split: "
            + ", ".join(f"{keyword} {value:.4f}" for keyword, value in thresholds.items())
        )
    if "measured" in card:
        lines.append(f"  measured {card['measured']}")
    if len(lines) == 1:
        lines.append("  no card yet: measure one with `kws card MODEL --data DATA --write`")
    return lines


def _threshold_words(threshold: float | str) -> str:
    return "the calibrated thresholds" if threshold == "calibrated" else f"threshold {threshold:g}"
