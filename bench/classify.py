"""Files/s of `kws classify` (files loaded in parallel, batched inference) against a naive per-file loop, same run.

    python bench/classify.py [--data ../shared/data/speech_commands] [--limit N] [--model speech_commands]
                             [--batch-size 64] [--workers 0] [--repeats 2] [--device cpu] [--threads N]

Both classify the clips of every word folder (or `--limit` of them, spread over the folders) with the same
model and torch thread count; the naive loop loads one file, pads it like a training clip, runs the model
(front end included, as loaded) and takes the softmax, then the next. kws classify runs the model's traced,
frozen copy on the CPU, so the ratio includes that. Prints the best of `--repeats` runs of each,
their ratio, and whether the two give the same top labels. Exit 0 always.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from machine import describe

from kws.audio import fit_length, load_audio
from kws.checkpoint import load_model
from kws.classify import classify_files, find_audio_files
from kws.train import resolve_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands"


def word_clips(data: Path, limit: int | None) -> list[Path]:
    """The clips of every word folder (not `_background_noise_`), or `limit` of them spread evenly."""
    folders = sorted(folder for folder in data.iterdir() if folder.is_dir() and not folder.name.startswith("_"))
    files = find_audio_files(folders)
    if limit and limit < len(files):
        files = [files[round(i * len(files) / limit)] for i in range(limit)]
    return files


def naive_labels(model: torch.nn.Module, labels: tuple[str, ...], files: list[Path], features, device) -> list:
    """(label, score) per file, one file at a time."""
    results = []
    with torch.no_grad():
        for path in files:
            waveform = fit_length(load_audio(path, features.sample_rate), features.clip_samples)
            posteriors = torch.softmax(model(torch.from_numpy(waveform)[None].to(device)).float(), dim=1)[0].cpu()
            best = int(posteriors.argmax())
            results.append((labels[best], float(posteriors[best])))
    return results


def timed(run) -> tuple[float, list]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Speech Commands-style folder")
    parser.add_argument("--limit", type=int, default=None, help="classify this many clips (default: all)")
    parser.add_argument("--model", default="speech_commands", help="model file, run folder or shipped model name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="files loaded in parallel (0: one per CPU core)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.data.is_dir():
        print(f"{args.data}: not found; nothing to measure (pass --data)")
        return
    device = resolve_device(args.device)
    model, info = load_model(args.model, device)
    files = word_clips(args.data, args.limit)
    for path in files:  # both runs start with the files in the page cache
        path.read_bytes()
    workers = args.workers or os.cpu_count()

    def run_kws() -> list:
        results = classify_files(model, info, files, 1, batch_size=args.batch_size, workers=workers, device=device)
        return [(result.label, result.score) for result in results]

    def run_naive() -> list:
        return naive_labels(model, info.labels, files, info.features, device)

    run_kws(), run_naive()  # warm-up: allocations, thread pools
    kws_seconds, naive_seconds = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so both see the same disturbances
        seconds, kws_results = timed(run_kws)
        kws_seconds = min(kws_seconds, seconds)
        seconds, naive_results = timed(run_naive)
        naive_seconds = min(naive_seconds, seconds)

    same = sum(ours[0] == theirs[0] for ours, theirs in zip(kws_results, naive_results))
    largest_difference = max(abs(ours[1] - theirs[1]) for ours, theirs in zip(kws_results, naive_results))
    kws_rate, naive_rate = len(files) / kws_seconds, len(files) / naive_seconds
    print(describe(str(device)))
    print(
        f"settings: model {args.model} ({info.architecture}, {len(info.labels)} labels, {info.features.clip_s:g} s "
        f"window), {len(files)} files from {args.data}; kws: batch {args.batch_size}, {workers} loader threads, "
        f"traced model on cpu; naive: as loaded; "
        f"best of {args.repeats}"
    )
    print()
    print(f"{'':>14}  {'files/s':>8}  {'seconds':>8}")
    print(f"{'kws classify':>14}  {kws_rate:>8.0f}  {kws_seconds:>8.2f}")
    print(f"{'naive loop':>14}  {naive_rate:>8.0f}  {naive_seconds:>8.2f}")
    print(f"{'ratio':>14}  {kws_rate / naive_rate:>7.2f}x")
    print()
    print(
        f"same top label: {same}/{len(files)} files"
        f"{'' if same == len(files) else ' (MISMATCH)'}; max |top score difference| {largest_difference:.1e}"
    )


if __name__ == "__main__":
    main()
