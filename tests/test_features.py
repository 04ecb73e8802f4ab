"""The front end against librosa (and torchaudio where it imports), batching, streaming and its settings."""

from __future__ import annotations

import dataclasses
import itertools

import librosa
import numpy as np
import pytest
import torch

from kws.audio import load_audio
from kws.config import FeatureConfig
from kws.errors import ConfigError
from kws.features import FrontEnd, StreamingFrontEnd

RATE = 16000


@pytest.fixture
def speech_like(chirp, noise) -> np.ndarray:
    """One second at a realistic level: a sweep over the speech band over a noise floor (no empty bins)."""
    return chirp(100, 7000, 1.0, RATE, amplitude=0.3) + noise(1.0, RATE, rms=0.02, seed=7)


def librosa_features(waveform: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """The reference: what `config` describes, computed by librosa in float64. (n_features, frames)."""
    signal = waveform.astype(np.float64)
    frame_settings = dict(
        n_fft=config.fft_size,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window="hann",
        center=True,
        pad_mode="constant",
    )
    if config.kind == "stft":
        power = np.abs(librosa.stft(signal, **frame_settings)) ** 2
    else:
        power = librosa.feature.melspectrogram(
            y=signal,
            sr=config.sample_rate,
            power=2.0,
            n_mels=config.n_mels,
            fmin=config.f_min,
            fmax=config.f_max_hz,
            **frame_settings,
        )
    decibels = librosa.power_to_db(power, ref=1.0, amin=config.log_floor, top_db=None)
    if config.kind == "mfcc":
        return librosa.feature.mfcc(S=decibels, n_mfcc=config.n_mfcc, dct_type=2, norm="ortho")
    return decibels


def assert_close_to_reference_db(
    features: np.ndarray, reference: np.ndarray, kind: str, near_peak_db: float = 5e-4
) -> None:
    if kind == "stft":
        # float32 rounding in a frame is relative to its loudest bin: bins far below it carry
        # proportionally larger errors in dB, so those are held to a looser bound.
        near_peak = reference > reference.max(axis=0, keepdims=True) - 60
        np.testing.assert_allclose(features[near_peak], reference[near_peak], rtol=0, atol=near_peak_db)
        np.testing.assert_allclose(features, reference, rtol=0, atol=0.05)
    else:
        np.testing.assert_allclose(features, reference, rtol=0, atol=5e-4)


SETTINGS = [
    pytest.param({}, id="defaults-30ms-nfft512-40mels"),
    pytest.param({"window_ms": 25.0, "n_fft": 400}, id="25ms-nfft400"),
    pytest.param({"window_ms": 25.0, "n_fft": None, "n_mels": 64, "f_max": 7600.0}, id="25ms-64mels-fmax"),
    pytest.param({"n_fft": 512, "f_min": 0.0, "log_floor": 1e-10}, id="nfft512-fmin0-floor1e-10"),
    pytest.param({"n_mels": 64, "n_mfcc": 13, "log_floor": 1e-2}, id="64mels-13mfcc-floor1e-2"),
]


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_front_end_equals_librosa(speech_like, kind, settings):
    config = FeatureConfig(kind=kind, **settings)

    features = FrontEnd(config)(torch.from_numpy(speech_like)[None])

    assert features.shape == (1, config.n_features, config.num_frames(len(speech_like)))
    assert_close_to_reference_db(features[0].double().numpy(), librosa_features(speech_like, config), kind)


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
def test_front_end_equals_librosa_on_real_speech(shared_data, kind):
    clips = sorted((shared_data / "speech_commands" / "yes").glob("*.wav"))[:3]
    if not clips:
        pytest.skip("no speech_commands/yes clips in the real data")

    config = FeatureConfig(kind=kind)
    front_end = FrontEnd(config)
    for path in clips:
        waveform = load_audio(path, RATE, num_samples=config.clip_samples)
        features = front_end(torch.from_numpy(waveform)[None])[0].double().numpy()
        reference = librosa_features(waveform, config)
        # Real recordings have near-silent frames, where float32 rounding is largest relative to power.
        loud = reference.max(axis=0) > reference.max() - 60
        assert_close_to_reference_db(features[:, loud], reference[:, loud], kind)


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_front_end_equals_torchaudio_mel_spectrogram(speech_like, kind):
    torchaudio = pytest.importorskip("torchaudio")
    config = FeatureConfig(kind=kind, window_ms=25.0, n_fft=512, n_mels=64, f_max=7600.0)
    mel_spectrogram = torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.fft_size,
        win_length=config.win_length,
        hop_length=config.hop_length,
        f_min=config.f_min,
        f_max=config.f_max_hz,
        n_mels=config.n_mels,
        window_fn=torch.hann_window,
        power=2.0,
        center=True,
        pad_mode="constant",
        norm="slaney",
        mel_scale="slaney",
    )
    waveform = torch.from_numpy(speech_like)[None]
    reference = torchaudio.functional.amplitude_to_DB(
        mel_spectrogram(waveform), multiplier=10.0, amin=config.log_floor, db_multiplier=0.0, top_db=None
    )
    if kind == "mfcc":
        dct = torchaudio.functional.create_dct(config.n_mfcc, config.n_mels, norm="ortho")
        reference = torch.matmul(reference.transpose(-1, -2), dct).transpose(-1, -2)

    features = FrontEnd(config)(waveform)

    torch.testing.assert_close(features, reference, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
@pytest.mark.parametrize("n_fft", [None, 400, 401, 512])
@pytest.mark.parametrize("num_samples", [1, 159, 160, 161, 4000, 12345, 16000])
def test_front_end_yields_num_frames_frames_of_n_features(kind, n_fft, num_samples):
    config = FeatureConfig(kind=kind, window_ms=25.0, n_fft=n_fft)
    waveform = torch.zeros(3, num_samples)

    features = FrontEnd(config)(waveform)

    assert features.shape == (3, config.n_features, config.num_frames(num_samples))


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
def test_a_batch_gives_the_same_features_as_its_clips_one_by_one(noise, chirp, kind):
    # 70 clips: more than the CPU front end's internal batch of 32, and not a multiple of it.
    sweep = chirp(300, 5000, 0.25, RATE, amplitude=0.2)
    clips = np.stack([sweep + noise(0.25, RATE, rms=0.01 * (1 + index % 5), seed=index) for index in range(70)])
    front_end = FrontEnd(FeatureConfig(kind=kind, normalization="meanvar"))

    batched = front_end(torch.from_numpy(clips))
    one_by_one = torch.cat([front_end(torch.from_numpy(clip)[None]) for clip in clips])

    torch.testing.assert_close(batched, one_by_one, rtol=1e-6, atol=1e-4)


def stream(front_end: FrontEnd, waveform: np.ndarray, chunk_sizes) -> torch.Tensor:
    streaming = StreamingFrontEnd(front_end)
    parts, start = [], 0
    for size in chunk_sizes:
        if start >= len(waveform):
            break
        parts.append(streaming.push(waveform[start : start + size]))
        start += size
    parts.append(streaming.flush())
    for part in parts:
        assert part.shape[0] == front_end.config.n_features
    return torch.cat(parts, dim=1)


# Frames computed in different batch shapes may round differently in the last float32 bit.
STREAMING_TOLERANCE = dict(rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
@pytest.mark.parametrize("chunk_size", [1, 7, 159, 160, 161, 1000, "whole"])
def test_streaming_frames_equal_offline_frames_for_any_chunk_size(speech_like, kind, chunk_size):
    waveform = speech_like[: round(0.4 * RATE)]
    front_end = FrontEnd(FeatureConfig(kind=kind, window_ms=25.0, n_fft=400))
    size = len(waveform) if chunk_size == "whole" else chunk_size

    streamed = stream(front_end, waveform, itertools.repeat(size))

    offline = front_end.frames(torch.from_numpy(waveform)[None])[0]
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, **STREAMING_TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_frames_equal_offline_frames_for_irregular_chunks(speech_like, seed):
    generator = np.random.default_rng(seed)
    chunk_sizes = generator.integers(0, 700, size=len(speech_like))  # empty chunks included
    front_end = FrontEnd(FeatureConfig(kind="logmel"))

    streamed = stream(front_end, speech_like, chunk_sizes)

    offline = front_end.frames(torch.from_numpy(speech_like)[None])[0]
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, **STREAMING_TOLERANCE)


@pytest.mark.parametrize("num_samples", [1, 100, 300])
def test_streaming_a_clip_shorter_than_a_window_gives_the_offline_frames(speech_like, num_samples):
    waveform = speech_like[:num_samples]
    front_end = FrontEnd(FeatureConfig())

    streamed = stream(front_end, waveform, [num_samples])

    offline = front_end.frames(torch.from_numpy(waveform)[None])[0]
    torch.testing.assert_close(streamed, offline, **STREAMING_TOLERANCE)


def test_streaming_counts_the_frames_it_emits(speech_like):
    front_end = FrontEnd(FeatureConfig())
    streaming = StreamingFrontEnd(front_end)

    emitted = sum(streaming.push(chunk).shape[1] for chunk in np.array_split(speech_like, 13))
    emitted += streaming.flush().shape[1]

    assert emitted == streaming.frames_emitted == front_end.config.num_frames(len(speech_like))


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
def test_mean_normalization_centres_every_feature_over_time(speech_like, kind):
    front_end = FrontEnd(FeatureConfig(kind=kind, normalization="mean"))
    waveform = torch.from_numpy(speech_like)[None]

    features = front_end(waveform)

    raw = front_end.frames(waveform)
    torch.testing.assert_close(features.mean(dim=-1), torch.zeros(features.shape[:2]), rtol=0, atol=1e-4)
    torch.testing.assert_close(features.std(dim=-1), raw.std(dim=-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
def test_meanvar_normalization_gives_every_feature_zero_mean_and_unit_variance(speech_like, kind):
    front_end = FrontEnd(FeatureConfig(kind=kind, normalization="meanvar"))

    features = front_end(torch.from_numpy(speech_like)[None]).double()

    torch.testing.assert_close(features.mean(dim=-1), torch.zeros(features.shape[:2]).double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        features.std(dim=-1, unbiased=False), torch.ones(features.shape[:2]).double(), atol=1e-3, rtol=0
    )


def test_no_normalization_returns_the_raw_frames(speech_like):
    front_end = FrontEnd(FeatureConfig(normalization="none"))
    waveform = torch.from_numpy(speech_like)[None]

    torch.testing.assert_close(front_end(waveform), front_end.frames(waveform), rtol=0, atol=0)


@pytest.mark.parametrize("log_floor", [1e-10, 1e-6, 1e-2])
@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
def test_silence_gives_finite_features_at_the_log_floor(kind, log_floor):
    config = FeatureConfig(kind=kind, log_floor=log_floor)
    silence = np.zeros(RATE, np.float32)

    features = FrontEnd(config)(torch.from_numpy(silence)[None])[0].double().numpy()

    assert np.isfinite(features).all()
    floor = np.full(
        (config.n_mels if kind == "mfcc" else config.n_features, features.shape[1]), 10 * np.log10(log_floor)
    )
    expected = librosa.feature.mfcc(S=floor, n_mfcc=config.n_mfcc, norm="ortho") if kind == "mfcc" else floor
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-4)


def test_silence_normalized_stays_finite():
    front_end = FrontEnd(FeatureConfig(normalization="meanvar"))

    features = front_end(torch.zeros(2, RATE))

    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, torch.zeros_like(features), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"kind": "spectrogram"}, "features.kind"),
        ({"normalization": "zscore"}, "features.normalization"),
        ({"kind": "mfcc", "n_mels": 40, "n_mfcc": 41}, "features.n_mfcc"),
        ({"kind": "mfcc", "n_mfcc": 0}, "features.n_mfcc"),
        ({"n_mels": 0, "n_mfcc": 1}, "features.n_mels"),
        ({"f_max": 8001.0}, "features.f_max"),
        ({"f_min": 9000.0}, "features.f_min"),
        ({"f_min": -1.0}, "features.f_min"),
        ({"hop_ms": -10.0}, "features.hop_ms"),
        ({"hop_ms": 0.01}, "features.hop_ms"),
        ({"window_ms": 0.0}, "features.window_ms"),
        ({"window_ms": 0.05}, "features.window_ms"),
        ({"n_fft": 256}, "features.n_fft"),
        ({"sample_rate": 0}, "features.sample_rate"),
        ({"clip_s": -1.0}, "features.clip_s"),
        ({"log_floor": 0.0}, "features.log_floor"),
        ({"log_floor": float("nan")}, "features.log_floor"),
    ],
)
def test_bad_feature_settings_raise_config_error_naming_the_key(settings, key):
    with pytest.raises(ConfigError) as raised:
        FeatureConfig(**settings)

    assert str(raised.value).startswith(key + ":")


def test_fingerprint_is_the_same_for_the_same_settings():
    first = FeatureConfig(kind="mfcc", n_mels=64, n_mfcc=13)
    second = FeatureConfig(kind="mfcc", n_mels=64, n_mfcc=13)

    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 16


# For every setting, a valid value other than its default.
OTHER_VALUES = {
    "sample_rate": 8000,
    "clip_s": 1.5,
    "window_ms": 25.0,
    "hop_ms": 20.0,
    "n_fft": 1024,
    "kind": "stft",
    "n_mels": 64,
    "n_mfcc": 13,
    "f_min": 0.0,
    "f_max": 4000.0,
    "log_floor": 1e-10,
    "normalization": "meanvar",
}


def test_other_values_cover_every_feature_setting():
    assert set(OTHER_VALUES) == {field.name for field in dataclasses.fields(FeatureConfig)}


@pytest.mark.parametrize("key", sorted(OTHER_VALUES))
def test_fingerprint_changes_when_any_setting_changes(key):
    default = FeatureConfig()

    changed = dataclasses.replace(default, **{key: OTHER_VALUES[key]})

    assert changed.fingerprint() != default.fingerprint()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc"])
def test_front_end_on_cuda_matches_cpu(speech_like, kind):
    front_end = FrontEnd(FeatureConfig(kind=kind))
    waveform = torch.from_numpy(np.stack([speech_like] * 40))

    on_cpu = front_end(waveform).double().numpy()
    on_cuda = front_end.to("cuda")(waveform.to("cuda")).cpu().double().numpy()

    # Two float32 FFTs (cuFFT, pocketfft) each rounding their own way: measured on an H200, one bin of
    # 25,667 differed by 8.1e-4 dB, above the bound a float32 front end keeps against float64 librosa.
    for cuda_features, cpu_features in zip(on_cuda, on_cpu, strict=True):
        assert_close_to_reference_db(cuda_features, cpu_features, kind, near_peak_db=2e-3)
