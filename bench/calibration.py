"""Does a calibrated detector hold on speech it was not calibrated on? One global threshold against one per keyword.

    python bench/calibration.py [--models speech_commands,runs/new] [--target 1.0] [--smoothing-ms 600]
                                [--repeats 4] [--streams DIR]

The validation split only (the testing split is never consulted): its recordings of speech without
keywords are dealt into two halves by recording, each half laid `--repeats` times as its own negative
stream (`make_negative_stream`); the keyword stream of the split is cut in two halves by time. Each
detector is calibrated to `--target` wrong firings an hour on one half (`kws calibrate` does this on
both) and measured on the other, both ways round; the counts of the two held-out halves are added.
A calibration that over-fits shows as false accepts on the held-out half well above the target.
Exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from machine import describe

from kws.calibrate import (
    ScoredStream,
    calibrate_global_threshold,
    calibrate_thresholds,
    make_streams,
    operating_point,
    poisson_interval,
    score_stream,
)
from kws.checkpoint import load_model
from kws.config import DataConfig
from kws.data import NOISE_FOLDER
from kws.stream import detector_config_for
from kws.stream_test import make_negative_stream

DEFAULT_DATA = Path(os.environ.get("KWS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def half_manifests(manifest: Path, folder: Path) -> list[Path]:
    """The validation rows of `manifest` dealt into two manifests by a hash of each recording's path."""
    with open(manifest, newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["split"] == "validation"]
    halves = []
    for half in (0, 1):
        out = folder / f"negatives_validation_half{half}.csv"
        chosen = [row for row in rows if hashlib.sha256(row["path"].encode()).digest()[0] % 2 == half]
        with open(out, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["path", "label", "split"], extrasaction="ignore")
            writer.writeheader()
            for row in chosen:
                writer.writerow({**row, "path": str((manifest.parent / row["path"]).resolve())})
        halves.append(out)
    return halves


def time_half(stream: ScoredStream, half: int) -> ScoredStream:
    """The first or second half of a stream by time, with the truth that lies in it."""
    middle = stream.duration_s / 2
    low, high = (0.0, middle) if half == 0 else (middle, stream.duration_s)
    keep = (stream.ends_s > low) & (stream.ends_s <= high)
    truth = tuple(replace(event, time_s=event.time_s - low) for event in stream.truth if low <= event.time_s < high)
    return replace(stream, ends_s=stream.ends_s[keep] - low, posteriors=stream.posteriors[keep],
                   duration_s=high - low, truth=truth)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="speech_commands", help="comma-separated models")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "speech_commands")
    parser.add_argument("--negatives", type=Path, default=DEFAULT_DATA / "negatives" / "manifest.csv")
    parser.add_argument("--target", type=float, default=1.0, help="wrong firings an hour to calibrate to")
    parser.add_argument("--smoothing-ms", type=float, default=None, help="default: the model's own")
    parser.add_argument("--rearm", choices=["on", "off", "both"], default="on",
                        help="re-arm a keyword only once it falls below its threshold (the default detector), "
                        "or by the refractory time alone, or compare both")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--streams", type=Path, default=Path("/tmp/kws-false-accepts"))
    args = parser.parse_args()

    print(describe())
    args.streams.mkdir(parents=True, exist_ok=True)
    noise = DataConfig(noise_dir=str(args.data / NOISE_FOLDER))
    negative_paths = []
    for half, manifest in enumerate(half_manifests(args.negatives, args.streams)):
        path = args.streams / f"negatives_validation_half{half}_x{args.repeats}.wav"
        if not path.with_suffix(".csv").exists():
            make_negative_stream(manifest, path, noise, "validation", repeats=args.repeats, seed=half)
        negative_paths.append(path)
    print(f"target {args.target:g} wrong firings an hour; calibrated on one half of the validation streams, "
          f"measured on the other, both ways round, counts added")  # fmt: skip
    print(f"{'model':<28} {'thresholds':<11} {'hits %':>6} {'FA':>4} {'FA/hour':>7} {'95% interval':>14} "
          f"{'kw-stream FA':>12}  thresholds chosen (half 0 | half 1)")  # fmt: skip
    for name in args.models.split(","):
        model, info = load_model(name)
        keyword_path, _ = make_streams(args.data, args.negatives, args.streams, "validation",
                                       info.features.sample_rate, args.repeats)  # fmt: skip
        keywords = score_stream(model, info, keyword_path)
        negatives = [score_stream(model, info, path) for path in negative_paths]
        own = replace(detector_config_for(info, smoothing_ms=args.smoothing_ms), keyword_thresholds=())
        labels, clip_s = info.labels, info.features.clip_s
        rearms = {"on": [True], "off": [False], "both": [True, False]}[args.rearm]
        for rearm, kind in [(rearm, kind) for rearm in rearms for kind in ("global", "per keyword")]:
            base = replace(own, rearm_below_threshold=rearm)
            totals = np.zeros(4)  # hits, spoken, false accepts, keyword-stream false accepts
            hours, chosen = 0.0, []
            for half in (0, 1):
                fitted = [negatives[half], time_half(keywords, half)]
                held_out = [negatives[1 - half], time_half(keywords, 1 - half)]
                if kind == "global":
                    threshold = calibrate_global_threshold(fitted, labels, clip_s, base, args.target)
                    config = replace(base, threshold=threshold)
                    chosen.append(f"{threshold:.3f}")
                else:
                    thresholds = calibrate_thresholds(fitted, labels, clip_s, base, args.target)
                    config = replace(base, keyword_thresholds=tuple(thresholds.items()))
                    chosen.append(" ".join(f"{value:.2f}" for value in thresholds.values()))
                point = operating_point(held_out[1], held_out[0], labels, clip_s, config)
                totals += (point.hits, point.keywords_spoken, point.false_accepts, point.keyword_stream_false_accepts)
                hours += point.negative_hours
            low, high = (bound / hours for bound in poisson_interval(int(totals[2])))
            kind = kind if rearm else f"{kind}, re-armed by time"
            print(f"{name[-28:]:<28} {kind:<11} {100 * totals[0] / totals[1]:>6.1f} {int(totals[2]):>4} "
                  f"{totals[2] / hours:>7.2f} {f'[{low:.2f}, {high:.2f}]':>14} {int(totals[3]):>12}  "
                  f"{' | '.join(chosen)}")  # fmt: skip
        print(f"{'':<28} (smoothing {own.smoothing_ms:g} ms; negative halves {negatives[0].hours:.2f} h and "
              f"{negatives[1].hours:.2f} h, keyword stream {keywords.duration_s / 60:.1f} min)")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
