"""`kws classify`: batched scores equal a per-file loop, long recordings report their best window, bad files
are named and skipped, and the rows come out in input order as JSON lines, CSV or a table."""

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kws.audio import fit_length, load_audio
from kws.checkpoint import ModelInfo, load_model
from kws.classify import choose_window, classify_files, csv_fields, find_audio_files
from kws.cli import app
from kws.config import FeatureConfig
from kws.errors import DataError

RATE = 16000
FEATURES = FeatureConfig(clip_s=0.5, n_mels=32, f_max=7600.0)  # conftest's model_file
LABELS = ("_silence_", "_unknown_", "yes", "no")


def run(*args: str | Path):
    result = CliRunner().invoke(app, ["classify", *(str(arg) for arg in args)])
    return result.exit_code, strip_ansi(result.stdout), strip_ansi(result.stderr)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class LoudnessModel(nn.Module):
    """(batch, samples) -> logits (0, 40 * rms): the label `loud` wins, the more certainly the louder the window."""

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        rms = waveform.square().mean(dim=1).sqrt()
        return torch.stack([torch.zeros_like(rms), 40 * rms], dim=1)


LOUDNESS_INFO = ModelInfo("loudness", {}, FeatureConfig(clip_s=1.0), ("_silence_", "loud"))


def naive_posteriors(model: nn.Module, info: ModelInfo, path: Path) -> np.ndarray:
    """The reference: one file at a time, loaded, padded like a training clip, through the model, softmax."""
    waveform = fit_length(load_audio(path, info.features.sample_rate), info.features.clip_samples)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(waveform)[None]), dim=1)[0].numpy()


def test_batched_results_equal_a_naive_per_file_loop(model_file, tmp_path, write_wav, tone, chirp, noise):
    files = [
        write_wav(tmp_path / "tone.wav", tone(440, 0.3), RATE),
        write_wav(tmp_path / "chirp.flac", chirp(200, 6000, 0.5), RATE),
        write_wav(tmp_path / "noise_8k.wav", noise(0.4, rate=8000, rms=0.05), 8000, "FLOAT"),
        write_wav(tmp_path / "stereo_44k.wav", np.stack([tone(300, 0.25, 44100), noise(0.25, 44100)], 1), 44100,
                  "PCM_24"),
        write_wav(tmp_path / "click.wav", np.r_[np.zeros(100), 0.8, np.zeros(100)], RATE),
        write_wav(tmp_path / "quiet.wav", noise(0.5, rms=0.001, seed=3), RATE),
        write_wav(tmp_path / "low.wav", tone(150, 0.45, amplitude=0.9), RATE),
    ]  # fmt: skip
    model, info = load_model(model_file)

    results = list(classify_files(model, info, files, top_k=len(LABELS), batch_size=3, workers=2))

    assert [result.path for result in results] == files
    for result in results:
        reference = naive_posteriors(model, info, result.path)
        assert result.error is None and result.windows == 1
        assert [label for label, _ in result.top] == [LABELS[i] for i in np.argsort(-reference)]
        np.testing.assert_allclose([score for _, score in result.top], np.sort(reference)[::-1], atol=1e-5)
        assert result.start_s == 0.0
        assert (
            result.end_s == pytest.approx(result.duration_s) == pytest.approx(len(load_audio(result.path, RATE)) / RATE)
        )


def test_a_long_recording_reports_the_window_a_naive_sliding_window_finds(model_file, tmp_path, write_wav, noise,
                                                                           chirp):  # fmt: skip
    recording = noise(2.3, rms=0.02, seed=5)
    recording[20000:28000] += chirp(300, 3000, 0.5)
    path = write_wav(tmp_path / "long.wav", recording, RATE, "FLOAT")
    model, info = load_model(model_file)
    window, hop = FEATURES.clip_samples, 800  # 50 ms

    # Windows end every hop from the start, over silence before the file and after it until the
    # window's centre has passed the last sample.
    count = math.ceil((len(recording) + window // 2) / hop)
    padded = np.concatenate([np.zeros(window, np.float32), recording, np.zeros(count * hop, np.float32)])
    with torch.no_grad():
        posteriors = torch.cat([
            torch.softmax(model(torch.from_numpy(padded[k * hop : k * hop + window])[None]), dim=1)
            for k in range(1, count + 1)
        ])  # fmt: skip
    keyword_top = [k for k in range(count) if LABELS[int(posteriors[k].argmax())] in ("yes", "no")]
    candidates = keyword_top or range(count)
    best = max(candidates, key=lambda k: float(posteriors[k].max()))
    end_s = (best + 1) * hop / RATE

    [result] = classify_files(model, info, [path], top_k=2, hop_ms=50, batch_size=7)

    assert result.windows == count
    assert result.start_s == pytest.approx(max(0.0, end_s - FEATURES.clip_s))
    assert result.end_s == pytest.approx(min(len(recording) / RATE, end_s))
    top_scores, top_labels = posteriors[best].topk(2)
    assert [label for label, _ in result.top] == [LABELS[i] for i in top_labels]
    np.testing.assert_allclose([score for _, score in result.top], top_scores.numpy(), atol=1e-5)


@pytest.mark.parametrize("event_s", [0.2, 3.3, 5.6])
def test_the_reported_window_of_a_long_recording_holds_its_loud_event(event_s, tmp_path, write_wav, noise, tone):
    recording = noise(6.0, rms=0.01, seed=1)
    start = round(event_s * RATE)
    recording[start : start + 4800] += tone(700, 0.3, amplitude=0.4)
    path = write_wav(tmp_path / "event.wav", recording, RATE, "FLOAT")

    [result] = classify_files(LoudnessModel(), LOUDNESS_INFO, [path])

    assert result.label == "loud"
    assert result.duration_s == pytest.approx(6.0)
    assert result.start_s <= event_s and result.end_s >= min(event_s + 0.3, 6.0) - 0.01
    assert result.end_s - result.start_s <= 1.0 + 1e-9
    assert 0.0 <= result.start_s and result.end_s <= 6.0


def test_a_keyword_that_wins_a_window_beats_a_more_certain_non_keyword():
    labels = ("_silence_", "_unknown_", "yes")
    posteriors = torch.tensor([
        [0.95, 0.03, 0.02],  # silence, very sure
        [0.52, 0.00, 0.48],  # the highest yes posterior, but silence is on top
        [0.10, 0.30, 0.60],  # yes on top
        [0.05, 0.40, 0.55],  # yes on top, less sure
    ])  # fmt: skip

    assert choose_window(posteriors, labels) == 2


def test_without_a_keyword_on_top_anywhere_the_most_certain_window_is_chosen():
    posteriors = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])

    assert choose_window(posteriors, ("_silence_", "_unknown_", "yes")) == 1
    assert choose_window(posteriors[:, :2], ("_silence_", "_unknown_")) == 1


def test_a_real_keyword_in_the_second_half_of_a_recording_is_found_there(shared_data, tmp_path, write_wav, noise):
    word_path = sorted((shared_data / "speech_commands" / "yes").glob("*.wav"))[0]
    word = load_audio(word_path, RATE)
    recording = noise(6.0, rms=0.003, seed=2)
    recording[56000 : 56000 + len(word)] += word  # at 3.5 s
    path = write_wav(tmp_path / "yes_late.wav", recording, RATE, "FLOAT")
    model, info = load_model("speech_commands")

    [result] = classify_files(model, info, [path])

    assert result.label == "yes"
    assert (result.start_s + result.end_s) / 2 > 3.0
    assert result.start_s < 3.5 + len(word) / RATE and result.end_s > 3.5


@pytest.fixture
def mixed_folder(tmp_path, write_wav, tone, noise) -> Path:
    """Two good clips and five bad files: empty, text, truncated, NaN, and (given separately) missing."""
    folder = tmp_path / "clips"
    write_wav(folder / "good1.wav", tone(500, 0.4), RATE)
    write_wav(folder / "good2.flac", noise(0.3, rms=0.05), RATE)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("yes, no, up, down\n" * 20)
    whole = write_wav(tmp_path / "whole.wav", tone(440, 0.5), RATE).read_bytes()
    (folder / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    signal = tone(440, 0.5)
    signal[1000] = np.nan
    write_wav(folder / "nan.wav", signal, RATE, "FLOAT")
    return folder


def test_bad_files_are_each_named_on_stderr_and_the_good_ones_still_classified(model_file, mixed_folder):
    missing = mixed_folder.parent / "missing.wav"

    code, stdout, stderr = run(mixed_folder, missing, "--model", model_file, "--format", "jsonl")

    assert code == 1
    rows = {Path(row["path"]).name: row for row in map(json.loads, stdout.splitlines())}
    assert set(rows) == {"good1.wav", "good2.flac", "empty.wav", "notes.wav", "truncated.wav", "nan.wav",
                         "missing.wav"}  # fmt: skip
    for name in ("good1.wav", "good2.flac"):
        assert rows[name]["error"] is None and rows[name]["label"] in LABELS
    skipped = [line for line in stderr.splitlines() if line.startswith("skipped: ")]
    for name, reason in [
        ("empty.wav", "empty file"),
        ("notes.wav", "not a readable audio file"),
        ("truncated.wav", "truncated file"),
        ("nan.wav", "NaN"),
        ("missing.wav", "file not found"),
    ]:
        path = str(missing if name == "missing.wav" else mixed_folder / name)
        assert [line for line in skipped if line.startswith(f"skipped: {path}: ")], name
        assert any(reason in line for line in skipped if path in line), name
        assert rows[name]["label"] is None and rows[name]["error"].startswith(f"{path}: ")
    assert len(skipped) == 5
    assert "Traceback" not in stderr
    assert "classified 2 of 7 files" in stderr


def test_jsonl_rows_have_every_field_in_input_order(model_file, tmp_path, write_wav, tone, noise):
    later = write_wav(tmp_path / "b.wav", tone(300, 0.2), RATE)
    earlier = write_wav(tmp_path / "a.wav", noise(0.5), RATE)

    code, stdout, stderr = run(later, earlier, "--model", model_file, "--format", "jsonl", "--top-k", "2")

    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(later), str(earlier)]
    for row in rows:
        assert set(row) == {"path", "duration_s", "label", "score", "top", "start_s", "end_s", "windows", "error"}
        assert len(row["top"]) == 2 and row["top"][0] == {"label": row["label"], "score": row["score"]}
        assert row["top"][0]["score"] >= row["top"][1]["score"]
        assert row["error"] is None and row["windows"] == 1 and row["start_s"] == 0.0
    assert [row["duration_s"] for row in rows] == [0.2, 0.5]
    assert re.search(r"classified 2 of 2 files in [\d.]+ s \(\d+ files/s\); top labels: ", stderr)


def test_csv_rows_parse_with_a_column_per_rank_and_agree_with_jsonl(model_file, tmp_path, write_wav, tone):
    files = [write_wav(tmp_path / f"clip{i}.wav", tone(200 + 300 * i, 0.3), RATE) for i in range(3)]
    (tmp_path / "broken.wav").write_text("not audio")

    code, stdout, _ = run(*files, tmp_path / "broken.wav", "--model", model_file, "--format", "csv")
    _, jsonl, _ = run(*files, tmp_path / "broken.wav", "--model", model_file, "--format", "jsonl")

    assert code == 1
    reader = csv.DictReader(io.StringIO(stdout))
    assert reader.fieldnames == csv_fields(3) == [
        "path", "duration_s", "label", "score", "label_2", "score_2", "label_3", "score_3", "start_s", "end_s",
        "windows", "error",
    ]  # fmt: skip
    rows = list(reader)
    assert [row["path"] for row in rows] == [*map(str, files), str(tmp_path / "broken.wav")]
    for row, expected in zip(rows, map(json.loads, jsonl.splitlines())):
        if expected["error"]:
            assert row["error"] == expected["error"] and row["label"] == row["score"] == ""
            continue
        assert row["error"] == ""
        assert [row["label"], row["label_2"], row["label_3"]] == [entry["label"] for entry in expected["top"]]
        assert [float(row["score"]), float(row["score_2"]), float(row["score_3"])] == [
            entry["score"] for entry in expected["top"]
        ]


def test_folders_are_searched_recursively_for_audio_in_natural_order(model_file, tmp_path, write_wav, tone):
    root = tmp_path / "root"
    for name in ("a/clip10.wav", "a/clip2.wav", "b/deeper/clip1.flac", "a/clip1.WAV"):
        write_wav(root / name, tone(400, 0.2), RATE)
    (root / "a" / "notes.txt").write_text("not audio")
    (root / "b" / "README").write_text("not audio")
    single = write_wav(tmp_path / "single.wav", tone(400, 0.2), RATE)

    code, stdout, _ = run(single, root, "--model", model_file)

    assert code == 0
    names = [Path(json.loads(line)["path"]).relative_to(tmp_path).as_posix() for line in stdout.splitlines()]
    assert names == ["single.wav", "root/a/clip1.WAV", "root/a/clip2.wav", "root/a/clip10.wav",
                     "root/b/deeper/clip1.flac"]  # fmt: skip


def test_no_audio_files_at_all_is_a_clear_error(model_file, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing to hear")

    code, stdout, stderr = run(tmp_path / "empty", "--model", model_file)

    assert code == 2
    assert stdout == ""
    assert "error: no audio files" in stderr and str(tmp_path / "empty") in stderr
    with pytest.raises(DataError, match="no audio files"):
        find_audio_files([tmp_path / "empty"])


def test_the_table_shows_each_file_with_its_labels_and_a_long_files_window(model_file, tmp_path, write_wav, tone,
                                                                           noise):  # fmt: skip
    short = write_wav(tmp_path / "short.wav", tone(300, 0.5), RATE)
    long = write_wav(tmp_path / "long.wav", noise(3.0, rms=0.05), RATE)

    code, stdout, stderr = run(short, long, "--model", model_file, "--format", "table", "--top-k", "2")

    assert code == 0
    assert "short.wav" in stdout and "long.wav" in stdout
    assert "2nd" in stdout and "3rd" not in stdout
    assert len(re.findall(r"\d\.\d\d-\d\.\d\d s", stdout)) == 1  # only the long file was scanned
    assert "classified 2 of 2 files" in stderr


def test_an_unknown_format_is_refused(model_file, tmp_path, write_wav, tone):
    path = write_wav(tmp_path / "clip.wav", tone(300, 0.2), RATE)

    code, stdout, stderr = run(path, "--model", model_file, "--format", "xml")

    assert code == 2 and stdout == ""
    assert "use table, jsonl or csv" in stderr


def test_the_shipped_model_calls_most_real_yes_clips_yes(shared_data):
    folder = shared_data / "speech_commands" / "yes"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")

    code, stdout, stderr = run(folder, "--format", "jsonl")

    assert code == 0, stderr
    labels = [json.loads(line)["label"] for line in stdout.splitlines()]
    assert len(labels) == len(list(folder.glob("*.wav"))) > 100
    assert labels.count("yes") / len(labels) >= 0.85
