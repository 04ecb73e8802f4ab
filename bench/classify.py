"""Files/s of `kws classify` (files loaded in parallel, batched inference) against a naive per-file loop, same run;
and of the same model exported to ONNX, float32 and int8, on onnxruntime.

    python bench/classify.py [--data ../shared/data/speech_commands] [--split all] [--limit N]
                             [--model speech_commands] [--batch-size 64] [--workers 0] [--repeats 2]
                             [--device cpu] [--threads N] [--no-onnx] [--calibration-clips 300]
                             [--dask 1,2] [--partition-files 500]

All classify the clips of every word folder (of `--split`, by the dataset's lists; or `--limit` of them,
spread over the folders) with the same model and thread count; the naive loop loads one file, pads it like
a training clip, runs the model (front end included, as loaded) and takes the softmax, then the next. kws
classify runs the model's traced, frozen copy on the CPU, so the ratio includes that. Unless `--no-onnx`,
the model is exported in this run (`kws export`, and `--int8` calibrated on `--calibration-clips` clips
of the training split of `--data`) and `kws classify` runs each export on onnxruntime with the same
threads. `--dask 1,2` adds `kws classify --engine dask` on local Dask clusters of 1 and 2 worker processes
(one torch thread each; `--partition-files` files per task), started before the timed runs (their start
is printed apart). Prints the best of `--repeats` interleaved runs of each, their ratio to the naive loop, and how
often each gives the PyTorch model's top label (and the largest difference of any class's posterior). Exit 0
always.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from machine import describe

from kws.audio import fit_length, load_audio
from kws.batch import ClassifyOptions, classify_in_partitions, partition_runner
from kws.checkpoint import load_model, resolve_model_path
from kws.classify import classify_files, find_audio_files
from kws.export import export_model
from kws.train import resolve_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands"


def word_clips(data: Path, limit: int | None, split: str = "all") -> list[Path]:
    """The clips of every word folder (not `_background_noise_`) in `split` (by the dataset's
    validation_list.txt and testing_list.txt; the rest is training), or `limit` of them spread evenly."""
    folders = sorted(folder for folder in data.iterdir() if folder.is_dir() and not folder.name.startswith("_"))
    files = find_audio_files(folders)
    if split != "all":
        listed = {name: set((data / f"{name}_list.txt").read_text().split()) for name in ("validation", "testing")}
        in_lists = set().union(*listed.values())
        files = [
            path for path in files
            if (str(path.relative_to(data)) in listed[split] if split in listed
                else str(path.relative_to(data)) not in in_lists)
        ]  # fmt: skip
    if limit and limit < len(files):
        files = [files[round(i * len(files) / limit)] for i in range(limit)]
    return files


def naive_labels(model: torch.nn.Module, labels: tuple[str, ...], files: list[Path], features, device) -> list:
    """(top label, {label: posterior}) per file, one file at a time."""
    results = []
    with torch.no_grad():
        for path in files:
            waveform = fit_length(load_audio(path, features.sample_rate), features.clip_samples)
            posteriors = torch.softmax(model(torch.from_numpy(waveform)[None].to(device)).float(), dim=1)[0].cpu()
            results.append((labels[int(posteriors.argmax())], dict(zip(labels, posteriors.tolist()))))
    return results


def timed(run) -> tuple[float, list]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Speech Commands-style folder")
    parser.add_argument("--split", default="all", choices=["all", "training", "validation", "testing"])
    parser.add_argument("--limit", type=int, default=None, help="classify this many clips (default: all)")
    parser.add_argument("--model", default="speech_commands", help="model file, run folder or shipped model name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="files loaded in parallel (0: one per CPU core)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime rows")
    parser.add_argument("--calibration-clips", type=int, default=300, help="int8: training clips to calibrate on")
    parser.add_argument("--dask", default="", help="worker counts of local Dask clusters to add, e.g. 1,2")
    parser.add_argument("--partition-files", type=int, default=500, help="files per Dask task")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.data.is_dir():
        print(f"{args.data}: not found; nothing to measure (pass --data)")
        return
    device = resolve_device(args.device)
    model, info = load_model(args.model, device)
    files = word_clips(args.data, args.limit, args.split)
    for path in files:  # every run starts with the files in the page cache
        path.read_bytes()
    workers = args.workers or os.cpu_count()
    folder = Path(tempfile.mkdtemp(prefix="kws-bench-classify-"))
    runtimes = {"kws classify": model}
    if not args.no_onnx:
        for name, int8 in (("onnxruntime", False), ("onnxruntime int8", True)):
            path = folder / f"{'int8' if int8 else 'float32'}.onnx"
            export_model(args.model, path, int8, args.data, args.calibration_clips)
            runtimes[name] = load_model(path)[0]

    def run_kws(runtime) -> list:
        results = classify_files(runtime, info, files, len(info.labels), batch_size=args.batch_size,
                                 workers=workers, device=device)  # fmt: skip
        return [(result.label, dict(result.top)) for result in results]

    def run_naive() -> list:
        return naive_labels(model, info.labels, files, info.features, device)

    clusters = ExitStack()
    engines = {}
    for count in [int(part) for part in args.dask.split(",") if part.strip()]:
        started = time.perf_counter()
        options = ClassifyOptions(len(info.labels), batch_size=args.batch_size, device=str(device), threads=1)
        runner = clusters.enter_context(partition_runner("dask", resolve_model_path(args.model), options, None, count))
        engines[f"dask, {count} worker{'s' * (count > 1)}"] = (runner, options)
        print(f"local Dask cluster of {count} worker(s) started in {time.perf_counter() - started:.1f} s")

    def run_engine(runner, options) -> list:
        results = classify_in_partitions(files, options, runner, args.partition_files)
        return [(result.label, dict(result.top)) for result in results]

    seconds = dict.fromkeys([*runtimes, *engines, "naive loop"], float("inf"))
    results: dict[str, list] = {}
    with clusters:
        for repeat in range(args.repeats + 1):  # the first is a warm-up: allocations, thread pools, the model
            for name, runtime in runtimes.items():  # interleaved, so all see the same disturbances
                took, results[name] = timed(lambda runtime=runtime: run_kws(runtime))
                seconds[name] = min(seconds[name], took) if repeat else seconds[name]
            for name, (runner, options) in engines.items():
                took, results[name] = timed(lambda runner=runner, options=options: run_engine(runner, options))
                seconds[name] = min(seconds[name], took) if repeat else seconds[name]
            took, results["naive loop"] = timed(run_naive)
            seconds["naive loop"] = min(seconds["naive loop"], took) if repeat else seconds["naive loop"]

    reference = results["kws classify"]
    print(describe(str(device)))
    print(
        f"settings: model {args.model} ({info.architecture}, {len(info.labels)} labels, {info.features.clip_s:g} s "
        f"window), {len(files)} files of the {args.split} split of {args.data}; kws: batch {args.batch_size}, "
        f"{workers} loader threads, traced model on cpu; naive: as loaded; onnxruntime {_onnxruntime_version()}, "
        f"{args.threads} threads, int8 calibrated on {args.calibration_clips} training clips; best of {args.repeats}"
    )
    print()
    print(f"{'':>18}  {'files/s':>8}  {'seconds':>8}  {'vs naive':>8}  {'same top label as PyTorch':>26}  "
          f"{'max |probability difference|':>28}")  # fmt: skip
    naive_rate = len(files) / seconds["naive loop"]
    for name in [*runtimes, *engines, "naive loop"]:
        rate = len(files) / seconds[name]
        same = sum(ours[0] == theirs[0] for ours, theirs in zip(results[name], reference))
        difference = max(abs(ours[1][label] - theirs[1][label]) for ours, theirs in zip(results[name], reference)
                         for label in ours[1])  # fmt: skip
        print(
            f"{name:>18}  {rate:>8.0f}  {seconds[name]:>8.2f}  {rate / naive_rate:>7.2f}x  "
            f"{f'{same}/{len(files)} ({100 * same / len(files):.2f}%)':>26}  {difference:>28.1e}"
        )


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "(not installed)"
    return onnxruntime.__version__


if __name__ == "__main__":
    main()
