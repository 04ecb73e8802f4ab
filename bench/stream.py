"""The streaming detector on a stream test: real-time factor, latency, and hits against false accepts per hour.

    python bench/stream.py [--model speech_commands] [--data ../shared/data/speech_commands] [--split validation]
                           [--no-onnx] [--calibration-clips 300]

Builds the stream with kws's own stream-test maker (every clip of the split once, over the split's span
of the background noise), then:
- real-time factor on one thread, audio fed in hop-sized chunks as a microphone would (the live path),
  and with the whole file pushed at once (batched, as `kws stream` reads files);
- detection latency: time from the end of the word (energy within 25 dB of its peak) to the event;
- hits and false accepts per hour at a range of thresholds (posteriors computed once, decisions swept);
- unless `--no-onnx`: the model exported in this run to ONNX, float32 and int8 (`kws export`, int8
  calibrated on `--calibration-clips` training clips of `--data`), on onnxruntime: the same real-time
  factors, and the detections of the model's own detector (its card's calibrated thresholds) against
  PyTorch's: how many, how many at the same time with the same keyword, hits and false accepts per hour.
Exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from machine import describe

from kws.audio import load_audio
from kws.checkpoint import load_model
from kws.export import export_model
from kws.stream import (
    DetectionPolicy,
    DetectorConfig,
    KeywordDetector,
    WindowScorer,
    detector_config_for,
    is_keyword,
    read_truth,
    score_detections,
)
from kws.stream_test import make_stream_test, read_word_times

DEFAULT_DATA = Path(os.environ.get("KWS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_time_factor(model, info, audio: np.ndarray, config: DetectorConfig, chunk_s: float | None) -> float:
    detector = KeywordDetector(model, info.labels, info.features, config)
    chunk = len(audio) if chunk_s is None else round(chunk_s * info.features.sample_rate)
    started = time.perf_counter()
    for start in range(0, len(audio), chunk):
        detector.push(audio[start : start + chunk])
    return (time.perf_counter() - started) / (len(audio) / info.features.sample_rate)


def latencies(detections, words) -> np.ndarray:
    """Event time minus the end of the word it matched (same label, window start within 0.75 s of the clip)."""
    found = []
    for detection in detections:
        near = [w for w in words if w.label == detection.keyword and abs(w.time_s - detection.window_start_s) <= 0.75]
        if near:
            found.append(detection.time_s - near[0].word_end_s)
    return np.array(found)


def compare_runtimes(args, model, info, audio, timed, truth, keywords, duration_s, config) -> None:
    """PyTorch against its exports on onnxruntime (float32, int8): real-time factors on 1 thread, and the
    detections of the model's own detector over the whole stream."""
    folder = Path(tempfile.mkdtemp(prefix="kws-bench-stream-"))
    runtimes = {"PyTorch": model}
    for name, int8 in (("onnxruntime", False), ("onnxruntime int8", True)):
        path = folder / f"{'int8' if int8 else 'float32'}.onnx"
        export_model(args.model, path, int8, args.data, args.calibration_clips)
        runtimes[name] = load_model(path)[0]
    own = detector_config_for(info)
    factors: dict[str, list[float]] = {name: [math.inf, math.inf] for name in runtimes}
    for _ in range(2):  # interleaved, best of two
        for name, runtime in runtimes.items():
            for index, chunk_s in enumerate((config.hop_ms / 1000, None)):
                factor = real_time_factor(runtime, info, timed, config, chunk_s)
                factors[name][index] = min(factors[name][index], factor)
    detections = {}
    for name, runtime in runtimes.items():
        detector = KeywordDetector(runtime, info.labels, info.features, own)
        detections[name] = detector.push(audio) + detector.flush()
    reference = {(round(d.time_s, 4), d.keyword) for d in detections["PyTorch"]}
    print()
    print(f"the model's own detector ({own.describe()}) over the whole stream, and real-time factors on 1 thread:")
    print(f"{'':>16}  {'RTF live':>8}  {'RTF file':>8}  {'detections':>10}  {'same as PyTorch':>15}  {'hits %':>6}  "
          f"{'FA/hour':>7}  {'max |score difference|':>22}")  # fmt: skip
    for name, found in detections.items():
        score = score_detections(found, truth, keywords, duration_s)
        same = sum((round(d.time_s, 4), d.keyword) in reference for d in found)
        scores = {(round(d.time_s, 4), d.keyword): d.score for d in detections["PyTorch"]}
        differences = [abs(d.score - scores[(round(d.time_s, 4), d.keyword)]) for d in found
                       if (round(d.time_s, 4), d.keyword) in scores]  # fmt: skip
        print(
            f"{name:>16}  {factors[name][0]:>8.4f}  {factors[name][1]:>8.4f}  {len(found):>10}  "
            f"{f'{same}/{len(reference)}':>15}  {100 * score.hit_rate:>6.1f}  {score.false_accepts_per_hour:>7.1f}  "
            f"{max(differences, default=0.0):>22.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="speech_commands")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "speech_commands")
    parser.add_argument("--split", default="validation", help="whose words make the stream")
    parser.add_argument("--stream", type=Path, help="use this stream test (.wav with .csv/.json) instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtf-seconds", type=float, default=300.0, help="audio used for the timing")
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.97,0.99")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime rows")
    parser.add_argument("--calibration-clips", type=int, default=300, help="int8: training clips to calibrate on")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model, info = load_model(args.model)
    config = DetectorConfig()
    if args.stream is None:
        folder = Path(tempfile.mkdtemp(prefix="kws-stream-"))
        test = make_stream_test(args.data, folder / f"{args.split}.wav", split=args.split, seed=args.seed)
        stream, truth_path, details = test.wav, test.truth, test.details
    else:
        stream, truth_path, details = args.stream, args.stream.with_suffix(".csv"), args.stream.with_suffix(".json")
    audio = load_audio(stream, info.features.sample_rate)
    duration_s = len(audio) / info.features.sample_rate
    truth, words = read_truth(truth_path), read_word_times(details)
    keywords = tuple(label for label in info.labels if is_keyword(label))
    spoken = sum(event.label in keywords for event in truth)

    print(describe())
    print(
        f"model {args.model} ({', '.join(info.labels)}); stream {stream}: {duration_s / 60:.1f} min, "
        f"{len(truth)} words of the {args.split} split, {spoken} of them keywords; detector: hop "
        f"{config.hop_ms:g} ms, smoothing {config.smoothing_ms:g} ms, refractory {config.refractory_s:g} s"
    )
    timed = audio[: round(args.rtf_seconds * info.features.sample_rate)]
    live = real_time_factor(model, info, timed, config, config.hop_ms / 1000)
    batched = real_time_factor(model, info, timed, config, None)
    print(
        f"real-time factor on 1 thread over {len(timed) / info.features.sample_rate:.0f} s: "
        f"{live:.4f} fed in {config.hop_ms:g} ms chunks (live), {batched:.4f} with the whole file at once; "
        f"{live * config.hop_ms:.2f} ms of compute per {config.hop_ms:g} ms hop"
    )
    if not args.no_onnx:
        compare_runtimes(args, model, info, audio, timed, truth, keywords, duration_s, config)

    torch.set_num_threads(os.cpu_count() or 1)
    scorer = WindowScorer(model, info.features, config.hop_ms)
    parts = [scorer.push(audio), scorer.flush()]
    ends = np.concatenate([part[0] for part in parts])
    posteriors = torch.cat([part[1] for part in parts if len(part[1])])
    print()
    print(f"{'threshold':>9}  {'hits %':>7}  {'correct':>7}  {'wrong':>5}  {'false pos':>9}  {'FA/hour':>8}  "
          f"{'latency median ms':>17}  {'p90 ms':>6}")  # fmt: skip
    for threshold in (float(value) for value in args.thresholds.split(",")):
        swept = replace(config, threshold=threshold)
        detections = DetectionPolicy(info.labels, swept, info.features.clip_s).update(ends, posteriors)
        score = score_detections(detections, truth, keywords, duration_s)
        delay = latencies(detections, words)
        marker = "  <- default" if threshold == config.threshold else ""
        median, p90 = (f"{1000 * np.percentile(delay, q):.0f}" if len(delay) else "-" for q in (50, 90))
        print(
            f"{threshold:>9.2f}  {100 * score.hit_rate:>7.1f}  {score.correct:>7}  {score.wrong:>5}  "
            f"{score.false_positives:>9}  {score.false_accepts_per_hour:>8.1f}  {median:>17}  {p90:>6}{marker}"
        )


if __name__ == "__main__":
    main()
