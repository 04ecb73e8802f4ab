"""Streaming test files: the words of one split at known times over that split's background noise.

Like TensorFlow's generate_streaming_test_wav: a long wav plus a `label,seconds` truth CSV (the time
is the start of the placed clip), and a JSON sidecar that also says where each word starts and ends,
which latency measurements need. A negative stream joins recordings that hold no keyword
(continuous speech), each several times over other noise and gain, to count false accepts per hour.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import soundfile

from kws.audio import load_audio, read_info
from kws.config import DataConfig
from kws.data import NOISE_SPLIT_SPANS, SILENCE, detect_layout, load_dataset
from kws.errors import AudioError, DataError
from kws.stream import TruthEvent, write_truth

NOISE_SEGMENT_S = 10.0  # the background switches recording (and place in it) this often
CROSSFADE_S = 0.05
WORD_LEVEL_BELOW_PEAK_DB = 25.0  # a 10 ms frame this far below the clip's loudest is not the word


@dataclass(frozen=True)
class PlacedWord:
    label: str
    time_s: float  # where the clip starts in the stream
    word_start_s: float  # where its speech starts and ends (energy within 25 dB of its loudest frame)
    word_end_s: float
    path: str


@dataclass(frozen=True)
class StreamTest:
    wav: Path
    truth: Path
    details: Path
    duration_s: float
    words: tuple[PlacedWord, ...]
    skipped: tuple[str, ...]
    noise_recordings: int = 0  # background noise recordings it was laid over


def speech_extent(waveform: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """(start, end) in seconds of the part of a clip within 25 dB of its loudest 10 ms frame."""
    frame = max(1, sample_rate // 100)
    count = max(1, len(waveform) // frame)
    frames = waveform[: count * frame].reshape(count, -1) if len(waveform) >= frame else waveform[None]
    level = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level >= level.max() - WORD_LEVEL_BELOW_PEAK_DB)
    return float(loud[0] * frame / sample_rate), float((loud[-1] + 1) * frame / sample_rate)


def spoken_data_config(config: DataConfig, source: Path) -> DataConfig:
    """The data settings for a stream: every word under its own name, no made-up silence clips."""
    config = replace(config.own_recordings(), silence_fraction=0.0)
    layout = config.layout if config.layout != "auto" else detect_layout(source)
    if layout == "speech_commands":
        folders = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        config = replace(config, layout=layout, words=tuple(folders), unknown=False)
    return config


def make_stream_test(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: DataConfig | None = None,
    split: str = "testing",
    sample_rate: int = 16000,
    gap_s: tuple[float, float] = (1.0, 2.0),
    noise_volume: float = 1.0,
    max_words: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> StreamTest:
    """Write `out` (.wav), its truth `.csv` and `.json`: each clip of `split` once, in random order,
    separated by `gap_s` (a uniform range) of background noise cut from the split's own span of the
    noise recordings, mixed in at `noise_volume` times its recorded level.
    """
    source = Path(source)
    out = Path(out).with_suffix(".wav")
    dataset, clips = _split_recordings(source, config, split)
    rng = random.Random(seed)
    rng.shuffle(clips)
    clips = clips[:max_words] if max_words else clips

    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        loaded = list(pool.map(lambda clip: _load_or_error(clip.path, sample_rate), clips))
    placed, pieces, skipped = [], [], []
    position = round(rng.uniform(*gap_s) * sample_rate)
    for clip, waveform in zip(clips, loaded):
        if isinstance(waveform, str):
            skipped.append(waveform)
            continue
        start, end = speech_extent(waveform, sample_rate)
        time_s = position / sample_rate
        placed.append(PlacedWord(clip.label, time_s, time_s + start, time_s + end, str(clip.path)))
        pieces.append((position, waveform))
        position += len(waveform) + round(rng.uniform(*gap_s) * sample_rate)
    stream = _background(dataset.noise_files, split, position, sample_rate, rng) * np.float32(noise_volume)
    for start, waveform in pieces:
        stream[start : start + len(waveform)] += waveform
    np.clip(stream, -1.0, 1.0, out=stream)

    test = StreamTest(out, out.with_suffix(".csv"), out.with_suffix(".json"), position / sample_rate,
                      tuple(placed), tuple(skipped), len(dataset.noise_files))  # fmt: skip
    _write_atomically(test, stream, sample_rate, source, split)
    return test


def make_negative_stream(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: DataConfig | None = None,
    split: str = "testing",
    sample_rate: int = 16000,
    repeats: int = 4,
    snr_db: tuple[float, float] = (5.0, 30.0),
    gain_db: tuple[float, float] = (-12.0, 6.0),
    gap_s: tuple[float, float] = (0.3, 1.2),
    seed: int = 0,
    workers: int | None = None,
) -> StreamTest:
    """Write `out` (.wav, .csv, .json): every recording of `split` (speech in which no keyword is said)
    laid end to end `repeats` times, each time in another order, at another gain (uniform in `gain_db`,
    relative to its recorded level) and over another stretch of the split's background noise at an SNR
    uniform in `snr_db` (against the recording's RMS), `gap_s` apart. Every detection in it is a false
    accept; repeating over other noise and gain lengthens a short split into a steadier count.
    """
    source = Path(source)
    out = Path(out).with_suffix(".wav")
    dataset, clips = _split_recordings(source, config, split)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        loaded = list(pool.map(lambda clip: _load_or_error(clip.path, sample_rate), clips))
    skipped = [waveform for waveform in loaded if isinstance(waveform, str)]
    usable = [(clip, waveform) for clip, waveform in zip(clips, loaded) if not isinstance(waveform, str)]
    noise = _noise_spans(dataset.noise_files, split, sample_rate)
    rng = random.Random(seed)
    fade = round(CROSSFADE_S * sample_rate)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    placed, pieces = [], []  # pieces: (start, speech, noise under the gap before it and the speech)
    position = 0
    for _ in range(repeats):
        order = list(usable)
        rng.shuffle(order)
        for clip, waveform in order:
            gap = round(rng.uniform(*gap_s) * sample_rate)
            speech = waveform * np.float32(10 ** (rng.uniform(*gain_db) / 20))
            rms = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2)))
            bed = np.zeros(gap + len(speech) + 2 * fade, np.float32)
            if noise and rms > 0:
                span = noise[rng.randrange(len(noise))]
                bed = np.resize(np.roll(span, -rng.randrange(len(span))), len(bed)).copy()
                bed_rms = float(np.sqrt(np.mean(bed.astype(np.float64) ** 2)))
                level = rms / 10 ** (rng.uniform(*snr_db) / 20)
                bed *= np.float32(level / bed_rms) if bed_rms > 0 else 0
                bed[:fade] *= ramp
                bed[-fade:] *= ramp[::-1]
            start = position + gap
            start_s = start / sample_rate
            begin, end = speech_extent(speech, sample_rate)
            placed.append(PlacedWord(clip.label, start_s, start_s + begin, start_s + end, str(clip.path)))
            pieces.append((position, start, speech, bed))
            position = start + len(speech)
    position += round(gap_s[1] * sample_rate)
    stream = np.zeros(position + 2 * fade, np.float32)
    for bed_start, start, speech, bed in pieces:
        stream[bed_start : bed_start + len(bed)] += bed
        stream[start + fade : start + fade + len(speech)] += speech
    stream = np.clip(stream[fade : fade + position], -1.0, 1.0)
    test = StreamTest(out, out.with_suffix(".csv"), out.with_suffix(".json"), position / sample_rate,
                      tuple(placed), tuple(skipped), len(noise))  # fmt: skip
    _write_atomically(test, stream, sample_rate, source, split)
    return test


def _split_recordings(source: Path, config: DataConfig | None, split: str) -> tuple:
    """The dataset and the recordings of its `split` (no made-up silence), or a data error."""
    dataset = load_dataset(spoken_data_config(config or DataConfig(), source), source)
    clips = [clip for clip in dataset.split(split) if clip.label != SILENCE]
    if not clips:
        raise DataError(f"{source}: no recordings in the {split} split")
    return dataset, clips


def _load_or_error(path: Path, sample_rate: int) -> np.ndarray | str:
    try:
        return load_audio(path, sample_rate)
    except AudioError as error:
        return str(error)


def _noise_spans(noise_files: tuple[Path, ...], split: str, sample_rate: int) -> list[np.ndarray]:
    """Each background-noise recording's span for `split` (see data.NOISE_SPLIT_SPANS)."""
    first, last = NOISE_SPLIT_SPANS[split]
    spans = []
    for path in noise_files:
        info = read_info(path)
        span = load_audio(path, sample_rate, offset_s=first * info.duration_s,
                          duration_s=(last - first) * info.duration_s)  # fmt: skip
        if len(span):
            spans.append(span)
    return spans


def _background(noise_files: tuple[Path, ...], split: str, length: int, sample_rate: int, rng) -> np.ndarray:
    """Noise from the split's span of each recording, in segments of random recordings and offsets."""
    spans = _noise_spans(noise_files, split, sample_rate)
    if not spans:
        return np.zeros(length, np.float32)
    segment = round(NOISE_SEGMENT_S * sample_rate)
    fade = round(CROSSFADE_S * sample_rate)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    stream = np.zeros(length + fade, np.float32)
    for start in range(0, length, segment):
        span = spans[rng.randrange(len(spans))]
        piece = np.roll(span, -rng.randrange(len(span)))
        piece = np.resize(piece, min(segment + fade, len(stream) - start)).copy()  # loops short spans
        piece[: min(fade, len(piece))] *= ramp[: len(piece)]
        if start + segment < length:
            piece[segment:] *= ramp[::-1][: len(piece) - segment]
        stream[start : start + len(piece)] += piece
    return stream[:length]


def _write_atomically(test: StreamTest, stream: np.ndarray, sample_rate: int, source: Path, split: str) -> None:
    """Write all three files aside, then move each into place: an interrupted run leaves no half file."""
    test.wav.parent.mkdir(parents=True, exist_ok=True)
    partial = {path: path.with_name(f".{path.name}.partial-{os.getpid()}") for path in (test.wav, test.truth,
                                                                                        test.details)}  # fmt: skip
    try:
        soundfile.write(str(partial[test.wav]), stream, sample_rate, subtype="PCM_16", format="WAV")
        write_truth(partial[test.truth], [TruthEvent(word.label, word.time_s) for word in test.words])
        details = {
            "source": str(source), "split": split, "sample_rate": sample_rate,
            "duration_s": round(test.duration_s, 3),
            "words": [asdict(word) for word in test.words],
        }  # fmt: skip
        partial[test.details].write_text(json.dumps(details, indent=1))
        for final, temporary in partial.items():
            os.replace(temporary, final)
    finally:
        for temporary in partial.values():
            temporary.unlink(missing_ok=True)


def read_word_times(details: str | os.PathLike) -> list[PlacedWord]:
    """The words of a stream test's JSON sidecar, with where each word's speech starts and ends."""
    try:
        values = json.loads(Path(details).read_text())
        return [PlacedWord(**word) for word in values["words"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{details}: not a stream test description ({error})") from None
