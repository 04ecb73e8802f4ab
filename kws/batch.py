"""Classifying many files in partitions: the file list cut into fixed parts, each part classified by an
engine (in this process, or on a Dask cluster: kws.dask_engine) and, with an output folder, written as
one file per part, so an interrupted run resumes where it stopped.

An output folder holds `run.json` (the model's SHA-256, the options and the file list's SHA-256: a rerun
with anything else is refused) and `part-00000.jsonl` (or `.csv`, `.parquet`), one per partition, each
written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from kws.checkpoint import load_model
from kws.classify import FileResult, classify_files, csv_fields
from kws.errors import DataError
from kws.models import optimize_for_inference

OUTPUT_FORMATS = ("jsonl", "csv", "parquet")
ENGINES = ("local", "dask")
RUN_FILE = "run.json"


@dataclass(frozen=True)
class ClassifyOptions:
    """What every engine passes to `classify_files`; `threads` is torch's threads per worker process."""

    top_k: int = 3
    hop_ms: float = 100.0
    batch_size: int = 64
    device: str = "cpu"
    threads: int = 1
    load_workers: int | None = None


# A partition's classifier: (its index, its files) -> one result per file, in order.
RunPartitions = Callable[[Sequence[tuple[int, list[Path]]]], Iterator[tuple[int, list[FileResult]]]]


def partition(files: Sequence[Path], files_per_partition: int) -> list[list[Path]]:
    """Consecutive parts of `files_per_partition` files (the last one shorter)."""
    return [list(files[start : start + files_per_partition]) for start in range(0, len(files), files_per_partition)]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class PartitionFolder:
    """An output folder of partition files; `run` describes the run and must match a folder's earlier run."""

    def __init__(self, folder: Path, output_format: str, run: dict) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise DataError(f"--format {output_format}: a partitioned run writes {', '.join(OUTPUT_FORMATS)}")
        self.folder, self.output_format = Path(folder), output_format
        run = {**run, "format": output_format}
        run_file = self.folder / RUN_FILE
        if run_file.is_file():
            earlier = json.loads(run_file.read_text())
            changed = [key for key in sorted(set(run) | set(earlier)) if run.get(key) != earlier.get(key)]
            if changed:
                raise DataError(
                    f"{self.folder}: holds another run (its {', '.join(changed)} differ); "
                    "choose another --out to start a new one"
                )
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise DataError(f"{self.folder}: exists and is not a kws classify output folder; choose another --out")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(run_file, lambda file: file.write(json.dumps(run, indent=2) + "\n"), "w")

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.{self.output_format}"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, results: Sequence[FileResult], top_k: int) -> None:
        if self.output_format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([result.to_dict() for result in results])
            _write_atomically(self.path(index), lambda file: pq.write_table(table, file), "wb")
        elif self.output_format == "csv":

            def write_csv(file) -> None:
                rows = csv.DictWriter(file, csv_fields(top_k), lineterminator="\n")
                rows.writeheader()
                rows.writerows(result.to_csv_row(top_k) for result in results)

            _write_atomically(self.path(index), write_csv, "w")
        else:
            lines = "".join(json.dumps(result.to_dict()) + "\n" for result in results)
            _write_atomically(self.path(index), lambda file: file.write(lines), "w")

    def read(self, index: int) -> list[FileResult]:
        path = self.path(index)
        if self.output_format == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif self.output_format == "csv":
            with open(path, newline="") as file:
                rows = list(csv.DictReader(file))
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [FileResult.from_dict(row) for row in rows]


def _write_atomically(path: Path, write: Callable, mode: str) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, mode) as file:
            write(file)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def run_locally(model_path: Path, options: ClassifyOptions) -> RunPartitions:
    """Partitions classified one after another in this process, the model loaded once."""

    def run(parts: Sequence[tuple[int, list[Path]]]) -> Iterator[tuple[int, list[FileResult]]]:
        model, info = load_model(model_path, options.device)
        model = optimize_for_inference(model, info.features.clip_samples)  # once, not per partition
        for index, files in parts:
            yield index, classify_partition(model, info, files, options)

    return run


@contextmanager
def partition_runner(
    engine: str, model_path: Path, options: ClassifyOptions, address: str | None = None, processes: int = 1
) -> Iterator[RunPartitions]:
    """The engine's way to run partitions: `local`, or `dask` on the scheduler at `address` (default: a
    local cluster of `processes` workers, stopped when the block ends)."""
    if engine == "dask":
        from kws.dask_engine import dask_client, run_on_dask

        with dask_client(address, processes) as client:
            yield run_on_dask(client, model_path, options)
    else:
        yield run_locally(model_path, options)


def classify_partition(model, info, files: list[Path], options: ClassifyOptions) -> list[FileResult]:
    """One partition's results, paths as given (files are opened by their absolute paths)."""
    results = classify_files(
        model, info, [path.absolute() for path in files], options.top_k, options.hop_ms, options.batch_size,
        options.load_workers, options.device,
    )  # fmt: skip
    return [replace(result, path=path) for path, result in zip(files, results)]


def classify_in_partitions(
    files: Sequence[Path],
    options: ClassifyOptions,
    run_partitions: RunPartitions,
    files_per_partition: int = 1000,
    out: PartitionFolder | None = None,
    on_earlier: Callable[[int], None] | None = None,
) -> Iterator[FileResult]:
    """Every file's result, in input order, as the partitions before it finish.

    With `out`, each partition is written there as it completes; partitions an earlier run finished are
    read back instead of classified again (`on_earlier` is told how many).
    """
    parts = partition(files, files_per_partition)
    earlier = {index for index in range(len(parts)) if out is not None and out.done(index)}
    if on_earlier and earlier:
        on_earlier(len(earlier))
    to_run = [(index, parts[index]) for index in range(len(parts)) if index not in earlier]
    finished: dict[int, list[FileResult]] = {}
    next_index = 0

    def in_order() -> Iterator[FileResult]:  # an earlier run's partitions are read back when their turn comes
        nonlocal next_index
        while next_index in finished or next_index in earlier:
            yield from finished.pop(next_index) if next_index in finished else out.read(next_index)
            next_index += 1

    yield from in_order()
    for index, results in run_partitions(to_run):
        if out is not None:
            out.write(index, results, options.top_k)
        finished[index] = results
        yield from in_order()


def describe_run(model_path: Path, files: Sequence[Path], options: ClassifyOptions, files_per_partition: int) -> dict:
    """What makes two runs the same, for `run.json`: the model's bytes, the file list, the options that
    change results."""
    listing = hashlib.sha256("".join(f"{path}\n" for path in files).encode()).hexdigest()
    return {
        "model_sha256": file_sha256(model_path),
        "files": len(files),
        "files_sha256": listing,
        "files_per_partition": files_per_partition,
        "top_k": options.top_k,
        "hop_ms": options.hop_ms,
    }
