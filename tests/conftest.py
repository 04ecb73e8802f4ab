"""Shared fixtures: small signals made at test time, a file writer, and the path to the real data."""

from __future__ import annotations

import os
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
