"""Hard-negative mining: a saved window is exactly the audio its detection scored, and `kws mine` keeps a
folder that resumes after a kill, names unreadable recordings and trains as `_unknown_` clips."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torch import nn
from typer.testing import CliRunner

from kws.audio import load_audio, resample
from kws.cli import app
from kws.config import DataConfig, FeatureConfig
from kws.data import UNKNOWN, load_clip, load_dataset
from kws.errors import DataError
from kws.mine import DetectionSaver, RecentAudio, find_recordings, mine_recordings, source_id
from kws.stream import DetectorConfig, KeywordDetector, detect_in_file

RATE = 16000
HALF_SECOND = FeatureConfig(clip_s=0.5)
WINDOW = HALF_SECOND.clip_samples
LABELS = ("_silence_", "beep")
BEEPS = DetectorConfig(threshold=0.6)
LSB = 1 / 32767  # a 16-bit file's step: what writing and reading back may change


class LoudnessModel(nn.Module):
    """Two classes, `_silence_` and `beep`: the window's loudness decides, so detections are predictable."""

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        level_db = 10 * torch.log10(waveform.square().mean(dim=1) + 1e-10)
        return torch.stack([torch.zeros_like(level_db), (level_db + 30.0) / 3.0], dim=1)


@pytest.fixture
def beeps(tone, noise):
    """`beeps(seconds, at_s, length_s=0.3)`: 1 kHz beeps at these times over faint noise."""

    def make(seconds: float, at_s: list[float], length_s: float = 0.3) -> np.ndarray:
        audio = noise(seconds, rms=0.001)
        for start in at_s:
            first = round(start * RATE)
            audio[first : first + round(length_s * RATE)] += tone(1000, length_s)
        return audio

    return make


def beep_detector(config: DetectorConfig = BEEPS) -> KeywordDetector:
    return KeywordDetector(LoudnessModel(), LABELS, HALF_SECOND, config)


def read_wav(path: Path) -> np.ndarray:
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (RATE, 1, "PCM_16", "WAV")
    return soundfile.read(str(path), dtype="float32")[0]


def expected_window(audio: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The source's samples [start, stop), silence outside it: computed independently of RecentAudio."""
    return np.array([audio[index] if 0 <= index < len(audio) else 0.0 for index in range(start, stop)], np.float32)


@pytest.mark.parametrize("chunk", [37, 1599, 4999, 10**6])
def test_each_saved_window_is_the_audio_its_detection_scored_for_any_chunk_size(chunk, beeps, tmp_path):
    audio = beeps(6.0, [1.0, 2.5, 4.0])
    saver = DetectionSaver(beep_detector(), tmp_path, "recording")
    found = []
    for start in range(0, len(audio), chunk):
        found += saver.push(audio[start : start + chunk])
    found += saver.flush()
    assert len(found) == 3 and len(saver.saved) == 3
    for detection, path in zip(found, saver.saved):
        assert path == tmp_path / "beep" / f"recording_nohash_{round(detection.time_s * 1000):08d}.wav"
        start = round(detection.window_start_s * RATE)
        stop = start + WINDOW
        assert detection.time_s - 0.3 <= detection.window_start_s + WINDOW / RATE <= detection.time_s  # 300 ms span
        np.testing.assert_allclose(read_wav(path), audio[start:stop], rtol=0, atol=LSB)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["beep", *(p.name for p in saver.saved)])


def test_a_file_run_saves_windows_of_the_audio_at_the_models_rate(beeps, tmp_path, write_wav):
    played = beeps(5.0, [1.2, 3.3])
    source = write_wav(tmp_path / "in" / "long.wav", resample(played, RATE, 44100), 44100, subtype="FLOAT")
    saver = DetectionSaver(beep_detector(), tmp_path / "out", source_id(source))
    run = detect_in_file(saver, source)
    assert len(run.detections) == 2
    heard = load_audio(source, RATE)  # what the detector was fed: the file at 16 kHz
    for detection, path in zip(run.detections, saver.saved):
        start = round(detection.window_start_s * RATE)
        np.testing.assert_allclose(read_wav(path), heard[start : start + WINDOW], rtol=0, atol=LSB + 1e-6)


def test_windows_reaching_before_the_start_or_past_the_end_are_padded_with_silence(beeps, tmp_path):
    audio = beeps(2.0, [0.0, 1.8], length_s=0.2)
    saver = DetectionSaver(beep_detector(DetectorConfig(threshold=0.6, smoothing_ms=100)), tmp_path, "edges")
    found = saver.push(audio) + saver.flush()
    assert len(found) == 2
    first, last = found
    assert first.window_start_s < 0  # it fires before half a second of audio exists
    for detection, path in zip(found, saver.saved):
        start = round(detection.window_start_s * RATE)
        np.testing.assert_allclose(read_wav(path), expected_window(audio, start, start + WINDOW), rtol=0, atol=LSB)
    silence = -round(first.window_start_s * RATE)
    assert not read_wav(saver.saved[0])[:silence].any()


def test_recent_audio_keeps_what_a_detection_can_still_need_and_refuses_what_is_gone(noise):
    audio = noise(1.0)
    recent = RecentAudio(keep_samples=1000)
    for start in range(0, 12000, 3000):
        recent.push(audio[start : start + 3000])
    # 12000 samples pushed; the last chunk started at 9000, so a window may start at 8000.
    np.testing.assert_array_equal(recent.cut(8000, 13000), expected_window(audio[:12000], 8000, 13000))
    with pytest.raises(ValueError, match="gone"):
        recent.cut(7999, 9000)


def mine(recordings, out_dir, config: DetectorConfig = BEEPS, **callbacks):
    return mine_recordings(LoudnessModel(), LABELS, HALF_SECOND, recordings, out_dir, config, model_name="loudness",
                           **callbacks)  # fmt: skip


@pytest.fixture
def recordings(tmp_path, beeps, write_wav) -> list[Path]:
    """Three recordings with 2, 1 and 3 beeps."""
    times = {"a.wav": [1.0, 3.0], "b.wav": [2.0], "c.wav": [0.5, 2.0, 3.5]}
    return [write_wav(tmp_path / "recordings" / name, beeps(4.5, at), RATE) for name, at in times.items()]


def mined_lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "mined.jsonl").read_text().splitlines()]


def test_mining_saves_and_lists_every_window_and_counts_false_accepts_per_hour(recordings, tmp_path):
    out = tmp_path / "mined"
    report = mine(recordings, out)
    assert (report.recordings, report.mined_now, report.already_done, report.failed) == (3, 3, 0, ())
    assert report.duration_s == pytest.approx(13.5)
    assert report.false_accepts() == {"beep": 6}
    assert report.per_hour(6) == pytest.approx(6 / (13.5 / 3600))
    lines = mined_lines(out)
    assert [Path(line["source"]).name for line in lines] == ["a.wav"] * 2 + ["b.wav"] + ["c.wav"] * 3
    assert sorted(out / line["path"] for line in lines) == sorted(out.rglob("*.wav"))
    for line in lines:
        assert set(line) == {"source", "time_s", "window_start_s", "keyword", "score", "path"}
        audio = load_audio(line["source"], RATE)
        start = round(line["window_start_s"] * RATE)
        np.testing.assert_allclose(read_wav(out / line["path"]), audio[start : start + WINDOW], rtol=0, atol=LSB)


def test_a_killed_run_continues_with_the_recordings_it_had_not_finished(recordings, tmp_path):
    out = tmp_path / "mined"

    def killed_after_a(path: Path) -> None:
        if path.name == "a.wav":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mine(recordings, out, on_recording=killed_after_a)
    assert [Path(line["source"]).name for line in mined_lines(out)] == ["a.wav", "a.wav"]
    # Killed while mining b, the run had written b's window but not listed it yet: mining b again
    # with the same settings writes the same window under the same name.
    reference = mine(recordings[1:2], tmp_path / "reference")
    (out / reference.windows[0].path).write_bytes(b"half")

    resumed = []
    report = mine(recordings, out, on_recording=resumed.append)
    assert (report.mined_now, report.already_done) == (2, 1)
    assert report.false_accepts() == {"beep": 6}
    lines = mined_lines(out)
    assert len(lines) == len({line["path"] for line in lines}) == 6
    assert sorted(out / line["path"] for line in lines) == sorted(out.rglob("*.wav"))
    read_wav(out / lines[2]["path"])  # b's window, written whole over the stray one


def test_a_folder_mined_with_other_settings_is_refused(recordings, tmp_path):
    mine(recordings[:1], tmp_path / "mined")
    with pytest.raises(DataError, match="another detector"):
        mine(recordings[:1], tmp_path / "mined", DetectorConfig(threshold=0.7))


def test_a_manifest_and_a_split_choose_only_that_splits_rows(recordings, tmp_path):
    manifest = tmp_path / "recordings" / "manifest.csv"
    manifest.write_text("path,label,split\na.wav,talk,training\nb.wav,talk,validation\nc.wav,talk,validation\n")
    assert find_recordings([manifest], "validation") == recordings[1:]
    assert find_recordings([manifest]) == recordings
    report = mine(find_recordings([manifest], "validation"), tmp_path / "mined")
    assert [Path(line["source"]).name for line in mined_lines(tmp_path / "mined")] == ["b.wav"] + ["c.wav"] * 3
    assert report.recordings == 2
    with pytest.raises(DataError, match="no rows in the testing split"):
        find_recordings([manifest], "testing")


def test_a_mined_folder_loads_as_unknown_training_clips_through_extra_unknown(recordings, words_folder, tmp_path):
    out = tmp_path / "mined"
    mine(recordings, out)
    saved = sorted(out.rglob("*.wav"))
    config = DataConfig(words=("yes", "no"), extra_unknown=(str(out),))
    dataset = load_dataset(config, words_folder)
    extra = sorted((clip for clip in dataset.clips if out in clip.path.parents), key=lambda clip: clip.path)
    assert [clip.path for clip in extra] == saved
    assert {(clip.label, clip.split) for clip in extra} == {(UNKNOWN, "training")}
    # Every window of a recording shares its recording's "speaker", which the split rule hashes.
    assert {clip.speaker for clip in extra} == {source_id(path) for path in recordings}
    np.testing.assert_allclose(load_clip(extra[0], RATE, WINDOW), read_wav(saved[0]), atol=1e-6)


# The command line, with the shipped model on real keyword clips --------------------------------


def run(*args):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


def say(shared_data: Path, words: tuple[str, ...], path: Path) -> Path:
    """A recording of these Speech Commands words (a clip of each) with silence around each."""
    pause = np.zeros(RATE // 2, np.float32)
    parts = [pause]
    for word in words:
        parts += [load_audio(sorted((shared_data / "speech_commands" / word).glob("*.wav"))[0], RATE), pause, pause]
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.concatenate(parts), RATE, subtype="PCM_16")
    return path


@pytest.fixture
def spoken_keywords(shared_data, tmp_path) -> Path:
    return say(shared_data, ("yes", "stop", "left"), tmp_path / "talk" / "spoken.wav")


def test_stream_saves_one_window_per_detection_it_prints(spoken_keywords, tmp_path):
    out = tmp_path / "detections"
    code, stdout, stderr = run("stream", spoken_keywords, "--save-detections", out)
    assert code == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert len(events) >= 2
    assert sorted(Path(event["saved_as"]) for event in events) == sorted(out.rglob("*.wav"))
    audio = load_audio(spoken_keywords, RATE)
    for event in events:
        path = Path(event["saved_as"])
        assert path.parent.name == event["keyword"]
        assert re.fullmatch(r"spoken-[0-9a-f]{8}_nohash_\d{8}\.wav", path.name)
        start = round(event["window_start_s"] * RATE)
        np.testing.assert_allclose(read_wav(path), expected_window(audio, start, start + RATE), rtol=0, atol=1e-4)
    assert f"saved {len(events)} window(s)" in stderr


def test_mine_command_names_a_broken_file_mines_the_rest_and_skips_them_when_run_again(spoken_keywords, tmp_path):
    folder = spoken_keywords.parent
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    out = tmp_path / "mined"
    code, stdout, stderr = run("mine", folder, "--out", out)
    assert code == 1 and stdout == ""
    named = [line for line in stderr.splitlines() if "broken.wav" in line]
    assert len(named) == 1 and named[0].startswith(f"skipped: {folder / 'broken.wav'}: not a readable audio file")
    assert "Traceback" not in stderr
    lines = mined_lines(out)
    assert len(lines) >= 2 and {Path(line["source"]).name for line in lines} == {"spoken.wav"}
    assert sorted(out / line["path"] for line in lines) == sorted(out.rglob("*.wav"))
    assert re.search(rf"│ all\s+│\s+{len(lines)}\s+│", stderr) and "mined 1 recording(s)" in stderr

    code, _, again = run("mine", folder, "--out", out)
    assert code == 1 and "mined 0 recording(s)" in again and "1 mined before, skipped" in again
    assert mined_lines(out) == lines
    assert re.search(rf"│ all\s+│\s+{len(lines)}\s+│", again)


def test_mine_split_needs_a_manifest(tmp_path):
    code, _, stderr = run("mine", tmp_path, "--out", tmp_path / "out", "--split", "validation")
    assert code == 2 and "manifest" in stderr


@pytest.mark.skipif(shutil.which("pulseaudio") is None, reason="PulseAudio is not installed")
def test_listen_saves_one_window_per_detection_of_what_the_microphone_heard(virtual_microphone, shared_data, tmp_path):
    from scipy.signal import correlate

    spoken = say(shared_data, ("yes",), tmp_path / "yes.wav")
    played = load_audio(spoken, RATE)
    out = tmp_path / "heard"
    command = [sys.executable, "-m", "kws", "listen", "--duration", str(len(played) / RATE + 1.0),
               "--save-detections", str(out)]  # fmt: skip
    listening = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "listening on" not in (line := listening.stderr.readline()):
        assert line, listening.communicate(timeout=60)
    subprocess.run(["paplay", f"--device={virtual_microphone}", str(spoken)], check=True, timeout=60)
    stdout, stderr = listening.communicate(timeout=60)
    assert listening.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events, stderr
    assert sorted(Path(event["saved_as"]) for event in events) == sorted(out.rglob("*.wav"))
    for event in events:
        window = read_wav(Path(event["saved_as"]))
        assert len(window) == RATE
        # The window is a stretch of what was played (resampled twice on the way: nearly, not exactly).
        match = correlate(played, window, mode="valid")
        energy = np.sqrt(np.convolve(played**2, np.ones(RATE), mode="valid"))
        assert np.max(match / (energy * np.linalg.norm(window) + 1e-9)) > 0.9
