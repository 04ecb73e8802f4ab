"""The one audio loader: any file soundfile reads becomes a mono float32 waveform at a chosen rate."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from kws.errors import AudioError

# libsndfile reports a WAV whose data chunk is shorter than its header says as "data : N (should be M)".
_TRUNCATED_DATA_CHUNK = re.compile(r"^data\s*:.*should be", re.MULTILINE)


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says: rate in Hz, length in samples, channels, format and subtype."""

    path: Path
    sample_rate: int
    frames: int
    channels: int
    format: str
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def read_info(path: str | os.PathLike) -> AudioInfo:
    """Read a file's header, raising `AudioError` for missing, empty, non-audio or truncated files."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as error:
        reason = str(error).split(": ", 1)[-1].strip() if ": " in str(error) else str(error)
        raise AudioError(f"{path}: not a readable audio file ({reason})") from None
    if _TRUNCATED_DATA_CHUNK.search(info.extra_info or ""):
        raise AudioError(f"{path}: truncated file (the audio data is shorter than its header says)")
    if info.frames <= 0:
        raise AudioError(f"{path}: holds no audio samples")
    if info.samplerate <= 0:
        raise AudioError(f"{path}: invalid sample rate {info.samplerate}")
    return AudioInfo(path, info.samplerate, info.frames, info.channels, info.format, info.subtype)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a 1-D float32 waveform with soxr's high-quality filter; a no-op when the rates agree."""
    if from_rate == to_rate:
        return waveform
    return soxr.resample(waveform, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Pad a short clip with silence on both sides, or cut a long one to its loudest `num_samples` stretch.

    Keyword clips hold one word; centring a short one and keeping the loudest part of a long one
    keeps the word in the window.
    """
    length = len(waveform)
    if length == num_samples:
        return waveform
    if length < num_samples:
        before = (num_samples - length) // 2
        return np.pad(waveform, (before, num_samples - length - before))
    start = int(np.argmax(_window_energies(waveform, num_samples)))
    return waveform[start : start + num_samples]


def _window_energies(waveform: np.ndarray, window: int) -> np.ndarray:
    """Sum of squares of every `window`-sample stretch, in float64 (one running sum, no loop)."""
    energy = np.concatenate([[0.0], np.cumsum(waveform.astype(np.float64) ** 2)])
    return energy[window:] - energy[:-window]


def loudest_db(waveform: np.ndarray, window: int) -> float:
    """RMS level in dBFS of the loudest `window`-sample stretch (the whole clip when shorter); -inf for
    digital silence. A spoken word's loudest 0.1 s is typically -35 to -10 dBFS."""
    window = max(1, min(window, len(waveform)))
    loudest = float(np.max(_window_energies(waveform, window))) / window
    return 10 * math.log10(loudest) if loudest > 0 else -math.inf


def load_audio(
    path: str | os.PathLike,
    sample_rate: int,
    num_samples: int | None = None,
    offset_s: float = 0.0,
    duration_s: float | None = None,
) -> np.ndarray:
    """Load `path` as mono float32 at `sample_rate` Hz, optionally padded or cut to `num_samples`.

    Returns shape (samples,), values nominally in [-1, 1]. Channels are averaged; other rates are
    resampled. `offset_s` and `duration_s` read only part of the file. Raises `AudioError` naming the
    file for anything that is not usable audio.
    """
    info = read_info(path)
    start = min(max(round(offset_s * info.sample_rate), 0), info.frames)
    stop = info.frames if duration_s is None else min(start + round(duration_s * info.sample_rate), info.frames)
    try:
        data, _ = soundfile.read(str(info.path), start=start, stop=stop, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise AudioError(f"{info.path}: cannot decode audio ({error})") from None
    if len(data) == 0:
        raise AudioError(f"{info.path}: holds no audio samples")
    if len(data) < stop - start:
        raise AudioError(f"{info.path}: truncated file (read {len(data)} of {stop - start} samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{info.path}: contains NaN or infinite samples")
    waveform = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    waveform = resample(np.ascontiguousarray(waveform), info.sample_rate, sample_rate)
    if num_samples is not None:
        waveform = fit_length(waveform, num_samples)
    return waveform


class StreamResampler:
    """Resamples a mono stream chunk by chunk; the concatenated output equals `resample` of the whole."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate, self.to_rate = from_rate, to_rate
        self._stream = None if from_rate == to_rate else soxr.ResampleStream(from_rate, to_rate, 1, "float32", "HQ")

    def push(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        return chunk if self._stream is None else self._stream.resample_chunk(chunk, last=last)

    def flush(self) -> np.ndarray:
        return self.push(np.zeros(0, np.float32), last=True)


def read_blocks(path: str | os.PathLike, sample_rate: int, block_s: float = 10.0) -> Iterator[np.ndarray]:
    """Read a long file as consecutive mono float32 blocks at `sample_rate`, without holding it all.

    The blocks joined equal `load_audio(path, sample_rate)`. Raises `AudioError` naming the file for
    unusable audio, at the block where the problem shows.
    """
    info = read_info(path)
    resampler = StreamResampler(info.sample_rate, sample_rate)
    read = 0
    try:
        with soundfile.SoundFile(str(info.path)) as handle:
            for data in handle.blocks(max(1, round(block_s * info.sample_rate)), dtype="float32", always_2d=True):
                if not np.isfinite(data).all():
                    raise AudioError(f"{info.path}: contains NaN or infinite samples")
                read += len(data)
                block = resampler.push(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
                if len(block):
                    yield block
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise AudioError(f"{info.path}: cannot decode audio ({error})") from None
    if read < info.frames:
        raise AudioError(f"{info.path}: truncated file (read {read} of {info.frames} samples)")
    tail = resampler.flush()
    if len(tail):
        yield tail
