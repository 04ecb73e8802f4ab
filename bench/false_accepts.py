"""False accepts per hour on continuous speech beside keyword hits, over a sweep of thresholds, as a DET curve.

    python bench/false_accepts.py [--models speech_commands,runs/new] [--split validation] [--repeats 4]
                                  [--streams DIR] [--out det.png]

Two streams per split, made once into --streams and reused: the keyword stream (every clip of the
split of Speech Commands, 1-2 s apart over background noise; `kws make-stream-test`) and the negative
stream (every recording of the split of ../shared/data/negatives, speech in which no keyword is said,
laid --repeats times at other gains over other background noise at 5-30 dB SNR; `kws make-stream-test
--negative`). Each model scores each window once; the decisions are swept. Printed per model: hits and
false accepts (count, per hour, 95% Poisson interval) at a range of global thresholds; the best hit rate
at <= 1 and <= 0.5 false accepts per hour; and the model's own detector (its calibrated per-keyword
thresholds when its card holds them, else the default threshold). The PNG draws miss rate against false
accepts per hour for every model, and per keyword for the last one. Choose with --split validation;
report --split testing once. Exit 0 whatever the figures.

`--models A+B` scores an ensemble: the mean of the posteriors of models with the same labels and window
(clip length and rate), with the first one's detector.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe

from kws.calibrate import SWEEP_THRESHOLDS, ScoredStream, best_at, make_streams, operating_point, score_stream, sweep
from kws.checkpoint import load_model
from kws.stream import detector_config_for

DEFAULT_DATA = Path(os.environ.get("KWS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHOWN_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)


def plot(curves: dict[str, list], per_keyword: tuple[str, dict], marks: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (overall, keywords) = plt.subplots(1, 2, figsize=(13, 5))
    for name, points in curves.items():
        rates = [point.false_accepts_per_hour for point in points]
        misses = [100 * (1 - point.hit_rate) for point in points]
        (line,) = overall.plot(rates, misses, marker=".", label=name)
        point = marks[name]
        overall.plot(point.false_accepts_per_hour, 100 * (1 - point.hit_rate), "o", markersize=10,
                     markerfacecolor="none", color=line.get_color())  # fmt: skip
    for axis in (overall, keywords):
        axis.set_xscale("symlog", linthresh=1.0)
        axis.set_xlim(left=0)
        axis.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_yscale("log")
        axis.set_ylim(1, 100)
        axis.set(xlabel="false accepts per hour on the negative stream", ylabel="keywords missed (%, log scale)")
        axis.grid(alpha=0.3, which="both")
    overall.set_title(f"{title}\n(circle: the model's own detector)")
    overall.legend()
    name, by_keyword = per_keyword
    for keyword, (rates, misses) in by_keyword.items():
        keywords.plot(rates, misses, marker=".", label=keyword)
    keywords.set_xlim(overall.get_xlim())
    keywords.set_title(f"{name}, per keyword\n(one global threshold swept)")
    keywords.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="speech_commands", help="comma-separated models")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "speech_commands")
    parser.add_argument("--negatives", type=Path, default=DEFAULT_DATA / "negatives" / "manifest.csv")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--repeats", type=int, default=4, help="times each negative recording is laid")
    parser.add_argument("--streams", type=Path, default=Path("/tmp/kws-false-accepts"))
    parser.add_argument("--out", type=Path, default=Path("det.png"))
    parser.add_argument("--smoothing-ms", default="", help="comma-separated smoothing spans to compare (default: own)")
    args = parser.parse_args()

    print(describe())
    curves, marks, per_keyword = {}, {}, None
    smoothings = [float(value) for value in args.smoothing_ms.split(",") if value]
    for name in args.models.split(","):
        started = time.perf_counter()
        members = [load_model(member) for member in name.split("+")]  # A+B: an ensemble
        info = members[0][1]
        window = (info.labels, info.features.sample_rate, info.features.clip_s)
        if any((other.labels, other.features.sample_rate, other.features.clip_s) != window for _, other in members):
            raise SystemExit(f"{name}: an ensemble's models need the same labels and window")
        keyword_path, negative_path = make_streams(args.data, args.negatives, args.streams, args.split,
                                                   info.features.sample_rate, args.repeats)  # fmt: skip
        if not curves:
            print(f"streams: {keyword_path}, {negative_path}")
        scored = [(score_stream(model, info, keyword_path), score_stream(model, info, negative_path))
                  for model, _ in members]  # fmt: skip
        keyword_stream, negative_stream = (mean_posteriors([streams[i] for streams in scored]) for i in (0, 1))
        print(f"\n{name}: both streams scored in {time.perf_counter() - started:.0f} s")
        for smoothing_ms in smoothings or [None]:
            own = detector_config_for(info, smoothing_ms=smoothing_ms)
            label = name if smoothing_ms is None else f"{name}, smoothing {smoothing_ms:g} ms"
            per_keyword = report(label, keyword_stream, negative_stream, info, own, curves, marks)
    plot(curves, per_keyword, marks, args.out, f"{args.split} streams")
    print(f"\nwrote {args.out}")


def mean_posteriors(streams: list[ScoredStream]) -> ScoredStream:
    """One stream scored by several models (an ensemble): their posteriors averaged window by window."""
    if len(streams) == 1:
        return streams[0]
    windows = min(len(stream.ends_s) for stream in streams)
    posteriors = np.mean([stream.posteriors[:windows] for stream in streams], axis=0)
    return dataclasses.replace(streams[0], ends_s=streams[0].ends_s[:windows], posteriors=posteriors)


def report(name, keyword_stream, negative_stream, info, own, curves, marks):
    """Sweep one detector's threshold on both streams, print its figures, and keep its curve."""
    thresholds = tuple(sorted(set(SWEEP_THRESHOLDS) | set(SHOWN_THRESHOLDS)))
    points = sweep(keyword_stream, negative_stream, info.labels, info.features.clip_s, own, thresholds)
    mine = operating_point(keyword_stream, negative_stream, info.labels, info.features.clip_s, own)
    curves[name], marks[name] = points, mine
    print()
    print(
        f"model {name}: keyword stream {keyword_stream.duration_s / 60:.1f} min ({points[0].keywords_spoken} "
        f"keywords), negative stream {negative_stream.hours:.2f} h"
    )
    print(f"{'threshold':>9}  {'hits %':>6}  {'FA':>5}  {'FA/hour':>7}  {'95% interval':>13}  "
          f"{'kw-stream FA':>12}  false accepts by keyword")  # fmt: skip
    for point in points:
        if point.config.threshold in SHOWN_THRESHOLDS:
            print(_row(f"{point.config.threshold:.4f}", point))
    print(_row("own", mine) + f"   <- {own.describe()}")
    for per_hour in (1.0, 0.5):
        best = best_at(points, per_hour)
        if best is None:
            print(f"  at <= {per_hour:g} FA/h: no threshold swept gets there")
        else:
            low, high = best.interval_per_hour()
            print(
                f"  at <= {per_hour:g} FA/h: {100 * best.hit_rate:.1f}% hits ({best.hits}/{best.keywords_spoken}) "
                f"at threshold {best.config.threshold:.4f}: {best.false_accepts} FA, "
                f"{best.false_accepts_per_hour:.2f}/h [{low:.2f}, {high:.2f}]"
            )
    keywords = [label for label in points[0].hits_by_keyword]
    per_keyword = (name, {
        keyword: (
            [point.false_accepts_by_keyword[keyword] / point.negative_hours for point in points],
            [100 * (1 - found / max(spoken, 1)) for found, spoken in (p.hits_by_keyword[keyword] for p in points)],
        )
        for keyword in keywords
    })  # fmt: skip
    print("  own detector per keyword (hits / spoken, false accepts): " + ", ".join(
        f"{keyword} {found}/{spoken} {mine.false_accepts_by_keyword[keyword]}"
        for keyword, (found, spoken) in mine.hits_by_keyword.items()
    ))  # fmt: skip
    return per_keyword


def _row(label: str, point) -> str:
    low, high = point.interval_per_hour()
    top = sorted(point.false_accepts_by_keyword.items(), key=lambda item: -item[1])
    named = ", ".join(f"{keyword} {count}" for keyword, count in top if count) or "-"
    return (
        f"{label:>9}  {100 * point.hit_rate:>6.1f}  {point.false_accepts:>5}  {point.false_accepts_per_hour:>7.2f}  "
        f"{f'[{low:.2f}, {high:.2f}]':>13}  {point.keyword_stream_false_accepts:>12}  {named}"
    )


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    np.set_printoptions(suppress=True)
    main()
