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
from rich import box
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kws.calibrate import make_streams, operating_point, score_stream
from kws.checkpoint import SHIPPED_MODELS, ModelInfo, load_model, read_info, resolve_model_path, rewrite_info
from kws.config import DataConfig
from kws.data import SILENCE, load_dataset
from kws.errors import ModelError
from kws.evaluate import dataset_config_for, evaluate_dataset
from kws.models import count_parameters, optimize_for_inference
from kws.onnx_model import OnnxModel
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
    included; the FFT is not counted), as torch's FlopCounterMode counts them, halved. An exported
    model gives the count of the PyTorch model it was exported from."""
    if isinstance(model, OnnxModel):
        return int(model.export.get("macs_per_window", 0))
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


def data_config(info: ModelInfo, split: str = CARD_SPLIT) -> DataConfig:
    """The data settings a model was trained with, reading its labels (the path comes separately)."""
    return build(DataConfig, dataset_config_for(info.recipe, info.labels, split), "data")


def measure_card(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    stream: str | os.PathLike | None = None,
    workers: int | None = None,
    on_step: Callable[[str], None] | None = None,
    negatives: str | os.PathLike | None = None,
    split: str = CARD_SPLIT,
) -> dict:
    """A model's card, measured on `data`'s `split` (testing, or all of a dataset of new speakers) and
    `stream` (a stream test with .csv beside it; made from the split when not given), with the model's own
    detector; with `negatives` (speech without keywords), also false accepts per hour on a stream of their
    testing split. The stored
    `training` and `detector` parts are kept."""
    step = on_step or (lambda text: None)
    data = Path(data)
    model, info = load_model(model_path)
    config = data_config(info, split)
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

    step(f"scoring the {split} split of {data}")
    dataset = load_dataset(config, data)
    clips = dataset.split(split)
    report, skipped = evaluate_dataset(model, info.labels, clips, info.features, workers=workers)
    card["test"] = {
        "data": str(data),
        "split": split,
        "clips": int(report.support.sum()),
        "speakers": len({clip.speaker for clip in clips if clip.label != SILENCE}),
        "skipped": len(skipped),
        "accuracy": round(report.accuracy, 5),
        "recall": {label: round(float(value), 4) for label, value in zip(info.labels, report.recall)},
    }

    with tempfile.TemporaryDirectory(prefix="kws-card-") as folder:
        negative_path = None
        if negatives is not None:
            step(f"making streams of the {split} speakers and of the {CARD_SPLIT} split of {negatives}")
            keyword_path, negative_path = make_streams(data, negatives, folder, split, info.features.sample_rate,
                                                       workers=workers, negative_split=CARD_SPLIT,
                                                       config=config)  # fmt: skip
            stream = stream or keyword_path
        if stream is None:
            step(f"making a stream test of the {split} speakers")
            stream = make_stream_test(data, Path(folder) / "stream.wav", config, split,
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
    if resolve_model_path(model_path).suffix == ".onnx":
        raise ModelError(
            f"{model_path}: an exported .onnx model's card is not rewritten; write it to the .safetensors model "
            "and export again (or keep this one with --json)"
        )
    info = read_info(model_path)
    rewrite_info(model_path, replace(info, card=card))


def _run_line(training: dict) -> str:
    """' with `COMMAND` (seed, epochs, best epoch, minutes)' of a run's training record."""
    command = f" with `{training['command']}`" if "command" in training else ""
    details = [f"{key} {training[key]}" for key in ("seed", "epochs", "best_epoch") if key in training]
    if "minutes" in training:
        details.append(f"{training['minutes']:.0f} min on {training.get('where', 'this machine')}")
    return command + (f" ({', '.join(details)})" if details else "")


def card_lines(name: str, info: ModelInfo) -> list[str]:
    """The card as lines of text, for `kws card`."""
    card = info.card
    lines = [f"{name}: {info.architecture}, labels {', '.join(info.labels)}"]
    training, made = card.get("training", {}), "trained"
    while training:  # the last run first, then the runs its --init came from
        lines.append(f"  {made}{_run_line(training)}")
        teachers = [teacher for teacher in training.get("teachers", []) if teacher]
        lines += [f"    taught by a model trained{_run_line(teacher)}" for teacher in teachers]
        training, made = training.get("init", {}), "  from a model trained"
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
            f"  streaming, {stream['minutes']:.1f} min of the {card['test']['split']} speakers "
            f"({stream['keywords_spoken']} keywords, {stream['other_words']} other words): "
            f"{100 * stream['hit_rate']:.1f}% hits, "
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
        chosen = ", ".join(f"{keyword} {value:.4f}" for keyword, value in thresholds.items()) or (
            f"{detector['settings']['threshold']:.4f} for every keyword"
        )
        lines.append(
            f"  detector: calibrated to {target:g} false accept(s) an hour on the "
            f"{detector['calibrated_on']['split']} split, {detector['settings']['smoothing_ms']:g} ms smoothing: "
            + chosen
        )
    if "measured" in card:
        lines.append(f"  measured {card['measured']}")
    if len(lines) == 1:
        lines.append("  no card yet: measure one with `kws card MODEL --data DATA --write`")
    return lines


def _threshold_words(threshold: float | str) -> str:
    return "the calibrated thresholds" if threshold == "calibrated" else f"threshold {threshold:g}"


def describe_models(paths: list[str | os.PathLike]) -> list[dict]:
    """A row per model, the shipped ones and then `paths`, with the main figures of its card: name,
    architecture, parameters, size, test accuracy, false accepts per hour (on continuous speech where the
    card measured it, else on the word stream), MACs per window, CPU ms per window, keywords."""
    rows = []
    for path in [*sorted(SHIPPED_MODELS.glob("*.safetensors")), *(resolve_model_path(path) for path in paths)]:
        model, info = load_model(path)
        card = info.card
        test = (card.get("test") or {}).get("accuracy", (info.metrics.get("test") or {}).get("accuracy"))
        on_speech = card.get("false_accepts")
        per_hour = (on_speech or card.get("stream") or {}).get("false_accepts_per_hour")
        macs = (card.get("macs") or {}).get("per_window")
        keywords = [label for label in info.labels if is_keyword(label)]
        rows.append({
            "model": path.stem if path.parent == SHIPPED_MODELS else str(path),
            "architecture": info.architecture,
            "parameters": count_parameters(model),
            "size_mb": round(path.stat().st_size / 1e6, 2),
            "test_accuracy": test,
            "false_accepts_per_hour": per_hour,
            "false_accepts_on": None if per_hour is None else "continuous speech" if on_speech else "word stream",
            "mmacs_per_window": None if macs is None else round(macs / 1e6, 2),
            "cpu_ms": (card.get("cpu_latency_ms") or {}).get("median"),
            "keywords": keywords,
            "other_labels": len(info.labels) - len(keywords),
        })  # fmt: skip
    return rows


def models_table(rows: list[dict]) -> Table:
    """`kws models` for people: full model names and keywords that wrap, so it reads at 80 columns."""
    caption = ("test: accuracy on speakers never trained on; FA/h: false accepts per hour on continuous speech "
               "(* on a word stream); ms: CPU per window")  # fmt: skip
    table = Table(title="models (kws card MODEL: the whole card)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True, caption=caption, caption_justify="left")  # fmt: skip
    table.add_column("model", no_wrap=True, min_width=max(len(row["model"]) for row in rows))
    for name in ("params", "MB", "test", "FA/h", "ms"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("keywords")
    for row in rows:
        fa = row["false_accepts_per_hour"]
        table.add_row(
            row["model"],
            f"{row['parameters'] / 1000:.0f}K" if row["parameters"] >= 1000 else str(row["parameters"]),
            f"{row['size_mb']:.2f}",
            "" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.1f}%",
            "" if fa is None else f"{fa:.1f}" + ("*" if row["false_accepts_on"] == "word stream" else ""),
            "" if row["cpu_ms"] is None else f"{row['cpu_ms']:.1f}",
            " ".join(row["keywords"]) + (f" (+{row['other_labels']})" if row["other_labels"] else ""),
        )
    return table
