"""Shared fixtures: small signals made at test time, a file writer, and the path to the real data."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tone() -> Callable[..., np.ndarray]:
    """`tone(freq_hz, seconds, rate=16000, amplitude=0.5, phase=0.0)`: a sine, float32, shape (samples,)."""

    def make(
        freq_hz: float, seconds: float, rate: int = 16000, amplitude: float = 0.5, phase: float = 0.0
    ) -> np.ndarray:
        time_s = np.arange(round(seconds * rate)) / rate
        return (amplitude * np.sin(2 * np.pi * freq_hz * time_s + phase)).astype(np.float32)

    return make


@pytest.fixture
def chirp() -> Callable[..., np.ndarray]:
    """`chirp(start_hz, end_hz, seconds, rate=16000, amplitude=0.5)`: a linear sweep, float32, (samples,)."""

    def make(start_hz: float, end_hz: float, seconds: float, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
        time_s = np.arange(round(seconds * rate)) / rate
        sweep_rate = (end_hz - start_hz) / seconds
        phase = 2 * np.pi * (start_hz * time_s + sweep_rate / 2 * time_s**2)
        return (amplitude * np.sin(phase)).astype(np.float32)

    return make


@pytest.fixture
def noise() -> Callable[..., np.ndarray]:
    """`noise(seconds, rate=16000, rms=0.1, seed=0)`: Gaussian white noise, float32, (samples,).

    The same seed always gives the same samples.
    """

    def make(seconds: float, rate: int = 16000, rms: float = 0.1, seed: int = 0) -> np.ndarray:
        generator = np.random.default_rng(seed)
        return (rms * generator.standard_normal(round(seconds * rate))).astype(np.float32)

    return make


@pytest.fixture
def write_wav() -> Callable[..., Path]:
    """`write_wav(path, samples, rate, subtype="PCM_16")`: write an audio file and return its path.

    `samples` is (samples,) or (samples, channels) in [-1, 1]. The container follows the file's
    suffix (.wav, .flac, .ogg, ...), so FLAC and OGG files are written the same way.
    """

    def write(path: str | os.PathLike, samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), np.asarray(samples), rate, subtype=subtype)
        return path

    return write


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder: $KWS_DATA, else `<repo>/../shared/data`; skips the test when absent."""
    path = Path(os.environ.get("KWS_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set KWS_DATA)")
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run torch on one thread: on a busy 2-core machine two threads contend and run many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def virtual_microphone(tmp_path_factory, monkeypatch):
    """A private PulseAudio daemon with a 16 kHz mono null sink `vmic`; its monitor is the default input."""
    runtime = tmp_path_factory.mktemp("pulse")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("PULSE_SERVER", raising=False)
    subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", f"--log-target=file:{runtime}/log"],
                   check=True, capture_output=True)  # fmt: skip
    monkeypatch.setenv("PULSE_SERVER", f"unix:{runtime}/pulse/native")
    try:
        for command in (
            ["load-module", "module-null-sink", "sink_name=vmic", "rate=16000", "channels=1",
             "sink_properties=device.description=vmic"],
            ["set-default-sink", "vmic"],
            ["set-default-source", "vmic.monitor"],
        ):  # fmt: skip
            subprocess.run(["pactl", *command], check=True, capture_output=True)
        yield "vmic"
    finally:
        subprocess.run(["pulseaudio", "--kill"], capture_output=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["pulseaudio", "--check"]).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)


# Made-up words for training tests -------------------------------------------------------------

SPEAKERS = ("spk0", "spk1", "spk2", "spk3", "spk4", "spk5")  # spk4 validates, spk5 tests
WORDS = ("yes", "no", "cat")  # cat is no keyword: _unknown_
RECIPE = """\
data: {path: words, words: [yes, no]}
features: {clip_s: 0.5}
model: {name: resnet_tiny}
train: {epochs: 3, batch_size: 4, seed: 0}
"""


@pytest.fixture
def words_folder(tmp_path, write_wav, tone, chirp, noise) -> Path:
    """A Speech Commands-style folder: yes (a low tone), no (a rising chirp) and cat (a high tone), 3 clips
    by each of 6 speakers, each speaker a little higher or lower; a noise recording; split lists."""
    root = tmp_path / "words"
    for number, speaker in enumerate(SPEAKERS):
        for index in range(3):
            pitch = 1 + 0.03 * (number - 2.5) + 0.01 * index
            floor = noise(0.4, rms=0.01, seed=10 * number + index)
            sounds = {
                "yes": tone(440 * pitch, 0.4),
                "no": chirp(1200 * pitch, 3000 * pitch, 0.4),
                "cat": tone(5000 * pitch, 0.4),
            }
            for word, sound in sounds.items():
                write_wav(root / word / f"{speaker}_nohash_{index}.wav", sound + floor, 16000)
    write_wav(root / "_background_noise_" / "room.wav", noise(12.0, rms=0.05, seed=99), 16000)
    for split, speaker in (("validation", "spk4"), ("testing", "spk5")):
        lines = [f"{word}/{speaker}_nohash_{index}.wav\n" for word in WORDS for index in range(3)]
        (root / f"{split}_list.txt").write_text("".join(lines))
    return root


@pytest.fixture
def recipe_path(words_folder) -> Path:
    path = words_folder.parent / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """An untrained resnet_tiny (0.5 s at 16 kHz, 32 mels; labels _silence_, _unknown_, yes, no) whose BatchNorm
    statistics have moved, so its outputs differ from clip to clip."""
    import torch

    from kws.checkpoint import ModelInfo, save_checkpoint
    from kws.config import FeatureConfig, ModelConfig
    from kws.models import build_model

    features = FeatureConfig(clip_s=0.5, n_mels=32, f_max=7600.0)
    labels = ("_silence_", "_unknown_", "yes", "no")
    torch.manual_seed(0)
    architecture, arguments = ModelConfig(name="resnet_tiny").architecture()
    model = build_model(architecture, arguments, len(labels), features).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scale in (0.3, 0.03, 0.1):
            model(scale * torch.randn(4, features.clip_samples, generator=generator))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, model.eval(), ModelInfo(architecture, arguments, features, labels))
    return path
