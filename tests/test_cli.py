"""The `kws` command line: exit codes, one-line errors on stderr, and the files `kws extract` writes.

Typer's CliRunner keeps stdout and stderr apart (`result.stdout`, `result.stderr`); rich output for
people goes to stderr.
"""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kws.extract
from kws import __version__
from kws.audio import load_audio
from kws.cli import app
from kws.config import FeatureConfig
from kws.features import FrontEnd

SHORT_CLIPS = ["--set", "features.clip_s=0.5"]


def run(*args: str | Path):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, strip_ansi(result.stdout), strip_ansi(result.stderr)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_the_commands():
    code, stdout, _ = run("--help")
    assert code == 0
    assert re.search(r"\bdataset\b", stdout) and re.search(r"\bextract\b", stdout)


def test_version_prints_the_version():
    code, stdout, _ = run("--version")
    assert (code, stdout.strip()) == (0, f"kws {__version__}")


def smooth_signal(rate: int, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """A tone plus a chirp, and a second tone, faded in and out so resampling has no edges to blur."""
    samples = round(rate * seconds)
    time_s = np.arange(samples) / rate
    envelope = np.sin(np.pi * np.arange(samples) / samples) ** 2
    chirp = np.sin(2 * np.pi * (300 + 3000 * time_s) * time_s)  # 300 Hz to 3.3 kHz
    middle = envelope * (0.3 * np.sin(2 * np.pi * 440 * time_s) + 0.1 * chirp)
    side = envelope * 0.1 * np.sin(2 * np.pi * 1000 * time_s)
    return middle, side


@pytest.fixture
def bad_folder(tmp_path, write_wav) -> Path:
    """A one-word folder: a corrupt, an empty and a fake wav, and a good 48 kHz stereo 24-bit one."""
    folder = tmp_path / "yes"
    folder.mkdir()
    body = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (folder / "corrupt.wav").write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("shopping: eggs, milk\n")
    middle, side = smooth_signal(48000, 0.5)
    # Left and right differ; their mean is `middle`.
    write_wav(folder / "good.wav", np.stack([middle + side, middle - side], axis=1), 48000, subtype="PCM_24")
    return folder


def test_extract_skips_bad_files_naming_each_with_its_reason_and_stores_the_good_one(bad_folder, tmp_path):
    out = tmp_path / "cache"
    code, _, stderr = run("extract", bad_folder, "--out", out, *SHORT_CLIPS)
    assert code == 1
    lines = stderr.splitlines()
    for name, reason in [
        ("corrupt.wav", "not a readable audio file"),
        ("empty.wav", "empty file (0 bytes)"),
        ("notes.wav", "not a readable audio file"),
    ]:
        assert any(name in line and reason in line for line in lines), (name, stderr)
    assert not any("good.wav" in line for line in lines)
    assert "3 file(s) skipped" in stderr

    manifest = json.loads((out / "cache.json").read_text())
    assert len(manifest["skipped"]) == 3
    assert sum(split["clips"] for split in manifest["splits"].values()) == 1


def test_extracted_48khz_stereo_24bit_clip_has_the_features_of_the_same_signal_at_16khz_mono(
    bad_folder, tmp_path, write_wav
):
    out = tmp_path / "cache"
    run("extract", bad_folder, "--out", out, *SHORT_CLIPS)
    (split,) = [path.stem for path in out.glob("*.jsonl") if path.read_text()]
    assert [json.loads(line)["path"] for line in (out / f"{split}.jsonl").read_text().splitlines()] == [
        str(bad_folder / "good.wav")
    ]
    config = FeatureConfig(clip_s=0.5)
    _, splits = kws.extract.load_feature_cache(out, config)
    with torch.no_grad():
        stored = FrontEnd(config)(splits[split].waveforms.read([0]))[0]

    middle, _ = smooth_signal(16000, 0.5)
    reference_path = write_wav(tmp_path / "reference.wav", middle, 16000, subtype="PCM_24")
    # The store keeps float16 samples: the reference goes through the same rounding, which can still
    # round the two (very nearly equal) signals apart by a step, a few hundredths of a dB.
    reference_waveform = torch.from_numpy(load_audio(reference_path, 16000, 8000)).half().float()
    with torch.no_grad():
        reference = FrontEnd(config)(reference_waveform[None])[0]
    assert stored.shape == reference.shape == (40, 51)
    assert reference.max() > 0 > reference.min()  # the signal and the floor are both in the features
    torch.testing.assert_close(stored, reference, atol=0.05, rtol=0)  # dB


def test_missing_dataset_is_one_line_on_stderr_and_exit_2(tmp_path):
    code, stdout, stderr = run("extract", tmp_path / "nowhere", "--out", tmp_path / "cache")
    assert code == 2
    assert stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: dataset not found"]
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["extract", "dataset"])
def test_bad_set_exits_2_naming_the_key(bad_folder, command):
    code, _, stderr = run(command, bad_folder, "--set", "features.n_melz=64")
    assert code == 2
    assert stderr.strip().splitlines() == ["error: the default recipe: unknown setting(s): features.n_melz"]


def test_bad_set_value_exits_2_naming_the_key(bad_folder):
    code, _, stderr = run("extract", bad_folder, "--set", "features.hop_ms=soon")
    assert code == 2
    assert "features.hop_ms" in stderr and "Traceback" not in stderr


def test_recipe_file_with_an_unknown_key_exits_2_naming_the_file_and_key(bad_folder, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  wordz: [yes]\n")
    code, _, stderr = run("dataset", bad_folder, "--config", recipe)
    assert code == 2
    assert f"{recipe}: unknown setting(s): data.wordz" in stderr


@pytest.fixture
def speech_commands(tmp_path, write_wav, tone, noise) -> Path:
    root = tmp_path / "speech_commands"
    for index, speaker in enumerate(("aaaa0001", "bbbb0002", "cccc0003")):
        for word in ("yes", "no", "bed"):
            write_wav(root / word / f"{speaker}_nohash_0.wav", tone(300 + 50 * index, 0.25), 16000)
    write_wav(root / "_background_noise_" / "room.wav", noise(12.0, seed=1), 16000)
    (root / "validation_list.txt").write_text("yes/bbbb0002_nohash_0.wav\nno/bbbb0002_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/cccc0003_nohash_0.wav\n")
    return root


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [cell for cell in re.split(r"[\s│┃|]+", line) if cell]
        if cells:
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_dataset_prints_the_table_of_classes_and_splits(speech_commands):
    code, stdout, stderr = run("dataset", speech_commands, "--set", "data.words=[yes]", "--set",
                               "data.silence_fraction=1")  # fmt: skip
    assert code == 0
    assert stdout == ""
    rows = table_rows(stderr)
    # no and bed are _unknown_; one silence clip per word clip of each split.
    assert rows["_silence_"] == ["6", "2", "1", "9"]
    assert rows["_unknown_"] == ["5", "1", "0", "6"]
    assert rows["yes"] == ["1", "1", "1", "3"]
    assert rows["clips"] == ["12", "4", "2", "18"]
    assert rows["speakers"] == ["3", "1", "1", "5"]
    assert "16000 Hz x 9" in stderr


def test_dataset_names_unreadable_files_and_exits_1(speech_commands):
    broken = speech_commands / "yes" / "dddd0004_nohash_0.wav"
    broken.write_bytes(b"RIFF")
    code, _, stderr = run("dataset", speech_commands)
    assert code == 1
    assert any(line.startswith("unreadable:") and str(broken) in line for line in stderr.splitlines())


def test_dataset_check_names_near_silent_clips_and_samples_that_are_not_numbers(speech_commands, write_wav, noise):
    faint = write_wav(speech_commands / "no" / "dddd0004_nohash_0.wav", noise(0.5, rms=0.0003, seed=3), 16000)
    samples = noise(0.5, seed=4)
    samples[100] = np.nan  # a sound header: only reading the samples finds it
    broken = write_wav(speech_commands / "yes" / "eeee0005_nohash_0.wav", samples, 16000, subtype="FLOAT")
    code, _, stderr = run("dataset", speech_commands)
    assert code == 0, stderr
    code, _, stderr = run("dataset", speech_commands, "--check")
    assert code == 1
    lines = stderr.splitlines()
    quiet = [line for line in lines if line.startswith("quiet:")]
    assert quiet == [f"quiet: {faint}: no, training, loudest 0.1 s at -70 dBFS; most likely no audible word"]
    assert any(line.startswith("unreadable:") and str(broken) in line and "NaN" in line for line in lines)
    assert "checked 11 recordings: 1 quiet (below -60 dBFS), 1 unreadable" in stderr
    code, _, stderr = run("dataset", speech_commands, "--check", "--quiet-db", "-80")
    assert not [line for line in stderr.splitlines() if line.startswith("quiet:")]


def test_extract_again_is_up_to_date_and_force_extracts_again(speech_commands, tmp_path):
    out = tmp_path / "cache"
    code, _, stderr = run("extract", speech_commands, "--out", out, *SHORT_CLIPS)
    assert code == 0 and f"wrote {out}" in stderr
    code, _, stderr = run("extract", speech_commands, "--out", out, *SHORT_CLIPS)
    assert code == 0 and f"{out}: up to date" in stderr
    code, _, stderr = run("extract", speech_commands, "--out", out, "--force", *SHORT_CLIPS)
    assert code == 0 and f"wrote {out}" in stderr


def test_extract_writes_by_default_where_train_looks_for_the_cache(speech_commands, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run("extract", speech_commands, "--workers", "1", *SHORT_CLIPS)
    assert code == 0
    (folder,) = (tmp_path / "features").iterdir()
    assert folder.name.startswith("speech_commands-")
    manifest = json.loads((folder / "cache.json").read_text())
    assert folder.name == f"speech_commands-{manifest['dataset_fingerprint']}"
    assert manifest["features"]["clip_s"] == 0.5


def test_extract_refuses_an_out_folder_that_is_not_a_cache(speech_commands, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "model.txt").write_text("precious")
    code, _, stderr = run("extract", speech_commands, "--out", out, *SHORT_CLIPS)
    assert code == 2
    assert "not a kws feature cache" in stderr
    assert [path.name for path in out.iterdir()] == ["model.txt"]


def test_interrupted_extract_exits_130_and_says_nothing_was_left_half_written(speech_commands, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kws.extract, "extract_features", interrupted)
    code, _, stderr = run("extract", speech_commands, "--out", tmp_path / "cache", *SHORT_CLIPS)
    assert code == 130
    assert "interrupted" in stderr
