"""Partitioned classification (`kws classify --out DIR`, `--engine dask`): every engine gives the labels of the
local run on every file, bad files are named as locally, partitions are written whole and read back, and a
rerun classifies only the partitions not yet written."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kws.batch import ClassifyOptions, PartitionFolder, classify_in_partitions, describe_run, partition, run_locally
from kws.classify import FileResult, find_audio_files
from kws.cli import app
from kws.errors import DataError

RATE = 16000


def run(*args: str | Path):
    result = CliRunner().invoke(app, ["classify", *(str(arg) for arg in args)])
    return result.exit_code, result.stdout, re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)


@pytest.fixture
def clips(tmp_path, write_wav, tone, noise) -> Path:
    """Eleven clips of tones and noise, one recording longer than the window, and two bad files."""
    folder = tmp_path / "clips"
    for index in range(11):
        signal = tone(150 + 170 * index, 0.4) if index % 2 else noise(0.45, rms=0.02 + 0.02 * index, seed=index)
        write_wav(folder / f"clip{index}.wav", signal, RATE)
    write_wav(folder / "long.flac", np.concatenate([noise(1.0, rms=0.01), tone(700, 0.4), noise(0.8)]), RATE)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("not audio\n" * 40)
    return folder


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_local_dask_cluster_gives_every_file_the_result_of_the_local_run(model_file, clips):
    _, local, local_err = run(clips, "--model", model_file, "--format", "jsonl")

    code, stdout, stderr = run(
        clips, "--model", model_file, "--format", "jsonl", "--engine", "dask", "--processes", "2",
        "--partition-files", "4",
    )  # fmt: skip

    assert code == 1  # two files skipped, as locally
    assert jsonl(stdout) == jsonl(local)  # same files, same order, same labels and scores
    assert len(jsonl(stdout)) == 14
    skipped = sorted(line for line in stderr.splitlines() if line.startswith("skipped: "))
    assert skipped == sorted(line for line in local_err.splitlines() if line.startswith("skipped: "))
    assert [line.split(": ")[1] for line in skipped] == [str(clips / "empty.wav"), str(clips / "notes.wav")]
    assert "Traceback" not in stderr and "classified 12 of 14 files" in stderr


@pytest.mark.parametrize("output_format", ["jsonl", "csv", "parquet"])
def test_partition_files_read_back_as_the_results_written(model_file, clips, tmp_path, output_format):
    files = find_audio_files([clips])
    options = ClassifyOptions(top_k=2)
    folder = PartitionFolder(tmp_path / "out", output_format, describe_run(model_file, files, options, 5))

    results = list(classify_in_partitions(files, options, run_locally(model_file, options), 5, folder))

    assert sorted(path.name for path in folder.folder.iterdir()) == [
        f"part-0000{index}.{output_format}" for index in range(3)
    ] + ["run.json"]
    read_back = [result for index in range(3) for result in folder.read(index)]
    assert [result.path for result in read_back] == files
    for written, read in zip(results, read_back):
        assert read.error == written.error and read.label == written.label
        if written.error is None:
            assert [label for label, _ in read.top] == [label for label, _ in written.top]
            assert np.allclose([score for _, score in read.top], [score for _, score in written.top], atol=1e-6)
            assert (read.start_s, read.end_s, read.windows) == pytest.approx(
                (written.start_s, written.end_s, written.windows), abs=1e-4
            )


def counting(runner, seen: list[int]):
    def run_partitions(parts):
        seen.extend(index for index, _ in parts)
        yield from runner(parts)

    return run_partitions


def test_a_rerun_classifies_only_the_partitions_not_yet_written(model_file, clips, tmp_path):
    files = find_audio_files([clips])
    options = ClassifyOptions()
    description = describe_run(model_file, files, options, 4)
    out = PartitionFolder(tmp_path / "out", "jsonl", description)
    first = list(classify_in_partitions(files, options, run_locally(model_file, options), 4, out))
    (tmp_path / "out" / "part-00001.jsonl").unlink()  # as if the run had stopped before writing it
    seen, told = [], []

    again = list(
        classify_in_partitions(
            files, options, counting(run_locally(model_file, options), seen), 4,
            PartitionFolder(tmp_path / "out", "jsonl", description), on_earlier=told.append,
        )
    )  # fmt: skip

    assert seen == [1] and told == [3]
    assert [result.to_dict() for result in again] == [result.to_dict() for result in first]


def test_a_run_stopped_mid_way_keeps_the_finished_partitions_and_no_partial_file(model_file, clips, tmp_path):
    files = find_audio_files([clips])
    options = ClassifyOptions()
    folder = PartitionFolder(tmp_path / "out", "jsonl", describe_run(model_file, files, options, 4))

    def interrupted(parts):
        for count, finished in enumerate(run_locally(model_file, options)(parts)):
            if count == 2:
                raise KeyboardInterrupt
            yield finished

    with pytest.raises(KeyboardInterrupt):
        list(classify_in_partitions(files, options, interrupted, 4, folder))

    assert sorted(path.name for path in folder.folder.iterdir()) == ["part-00000.jsonl", "part-00001.jsonl", "run.json"]
    assert len(folder.read(1)) == 4


def test_an_output_folder_of_another_run_is_refused_naming_what_differs(model_file, clips, tmp_path):
    files = find_audio_files([clips])
    PartitionFolder(tmp_path / "out", "jsonl", describe_run(model_file, files, ClassifyOptions(), 4))

    with pytest.raises(DataError, match=r"files_per_partition, format differ"):
        PartitionFolder(tmp_path / "out", "csv", describe_run(model_file, files, ClassifyOptions(), 5))
    with pytest.raises(DataError, match=r"files, files_sha256 differ"):
        PartitionFolder(tmp_path / "out", "jsonl", describe_run(model_file, files[:3], ClassifyOptions(), 4))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a kws classify output folder"):
        PartitionFolder(tmp_path / "other", "jsonl", describe_run(model_file, files, ClassifyOptions(), 4))


def test_classify_out_writes_parquet_partitions_and_reports_a_rerun(model_file, clips, tmp_path):
    out = tmp_path / "labels"
    args = (clips, "--model", model_file, "--out", out, "--format", "parquet", "--partition-files", "5")

    code, stdout, stderr = run(*args)
    again_code, _, again = run(*args)

    assert code == 1 and stdout == ""  # the rows are in the files
    assert sorted(path.name for path in out.glob("part-*")) == [f"part-0000{index}.parquet" for index in range(3)]
    assert "classified 12 of 14 files" in stderr and f"results in {out}/part-*.parquet" in stderr
    assert again_code == 1 and "3 partition(s) done by an earlier run" in again and "classified 12 of 14" in again


def test_parquet_to_the_terminal_and_an_unknown_engine_are_refused(model_file, clips):
    code, _, stderr = run(clips, "--model", model_file, "--format", "parquet")
    assert code == 2 and "parquet needs --out" in re.sub(r"[\s│]+", " ", stderr)  # the message may wrap
    code, _, stderr = run(clips, "--model", model_file, "--engine", "spark")
    assert code == 2 and "use local or dask" in stderr


def test_partitions_are_consecutive_and_cover_every_file():
    files = [Path(f"f{index}.wav") for index in range(10)]
    assert partition(files, 4) == [files[0:4], files[4:8], files[8:10]]
    assert partition(files, 10) == [files]


def test_a_csv_row_reads_back_with_its_runners_up():
    result = FileResult(Path("a.wav"), 1.0, (("yes", 0.9), ("no", 0.05), ("up", 0.01)), 0.0, 1.0, 1)
    row = {key: str(value) for key, value in result.to_csv_row(3).items()}
    assert FileResult.from_dict(row) == result
