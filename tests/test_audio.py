"""The audio loader: formats, channels, rates, lengths, partial reads and every kind of bad file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kws.audio import fit_length, load_audio, loudest_db, read_info
from kws.errors import AudioError

RATE = 16000


def peak_frequency_hz(waveform: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[np.argmax(spectrum)])


# Lossless formats may differ from the float signal by about one quantisation step (2 ** -(bits - 1)).
@pytest.mark.parametrize(
    ("suffix", "subtype", "tolerance"),
    [
        (".wav", "PCM_U8", 2**-6),
        (".wav", "PCM_16", 2**-14),
        (".wav", "PCM_24", 2**-22),
        (".wav", "PCM_32", 1e-7),  # float32 output holds 24 bits of mantissa
        (".wav", "FLOAT", 0.0),
        (".flac", "PCM_16", 2**-14),
        (".flac", "PCM_24", 2**-22),
    ],
)
def test_lossless_files_load_as_float32_mono_close_to_the_written_signal(
    tmp_path, write_wav, chirp, suffix, subtype, tolerance
):
    signal = chirp(200, 3000, 0.5, RATE, amplitude=0.5)
    path = write_wav(tmp_path / f"clip{suffix}", signal, RATE, subtype)

    waveform = load_audio(path, RATE)

    assert waveform.dtype == np.float32
    assert waveform.shape == signal.shape
    np.testing.assert_allclose(waveform, signal, rtol=0, atol=tolerance)


def test_ogg_vorbis_loads_at_full_length_and_close_to_the_written_signal(tmp_path, write_wav, chirp):
    signal = chirp(200, 3000, 0.5, RATE, amplitude=0.5)
    path = write_wav(tmp_path / "clip.ogg", signal, RATE, "VORBIS")

    waveform = load_audio(path, RATE)

    assert waveform.dtype == np.float32
    assert waveform.shape == signal.shape
    error = waveform.astype(np.float64) - signal
    signal_to_error_db = 10 * np.log10(np.sum(signal.astype(np.float64) ** 2) / np.sum(error**2))
    assert signal_to_error_db > 20  # lossy, but the same waveform


def test_stereo_channels_are_averaged(tmp_path, write_wav, tone, chirp):
    left, right = tone(440, 0.25, RATE, 0.4), chirp(100, 2000, 0.25, RATE, 0.3)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), RATE, "FLOAT")

    waveform = load_audio(path, RATE)

    assert waveform.ndim == 1
    np.testing.assert_allclose(waveform, (left + right) / 2, rtol=0, atol=1e-7)


def test_48khz_stereo_24bit_tone_resampled_to_16khz_keeps_its_frequency_and_amplitude(tmp_path, write_wav, tone):
    left, right = tone(1000, 1.0, 48000, 0.6), tone(1000, 1.0, 48000, 0.2)
    path = write_wav(tmp_path / "studio.wav", np.stack([left, right], axis=1), 48000, "PCM_24")

    waveform = load_audio(path, RATE)

    assert len(waveform) == RATE
    assert peak_frequency_hz(waveform, RATE) == pytest.approx(1000, abs=1)
    # Away from the filter's start-up at the edges, the result is the same tone sampled at 16 kHz.
    expected = tone(1000, 1.0, RATE, 0.4)
    edge = RATE // 20
    np.testing.assert_allclose(waveform[edge:-edge], expected[edge:-edge], rtol=0, atol=1e-4)


def test_8khz_tone_resampled_to_16khz_keeps_its_frequency_and_adds_no_images(tmp_path, write_wav, tone):
    path = write_wav(tmp_path / "phone.wav", tone(1000, 1.0, 8000, 0.5), 8000, "FLOAT")

    waveform = load_audio(path, RATE)

    assert len(waveform) == RATE
    assert peak_frequency_hz(waveform, RATE) == pytest.approx(1000, abs=1)
    edge = RATE // 20
    expected = tone(1000, 1.0, RATE, 0.5)
    np.testing.assert_allclose(waveform[edge:-edge], expected[edge:-edge], rtol=0, atol=1e-4)
    # Upsampling must not mirror the tone above the old Nyquist frequency (7 kHz image of 1 kHz).
    spectrum = np.abs(np.fft.rfft(waveform))
    above_old_nyquist = spectrum[np.fft.rfftfreq(RATE, 1 / RATE) > 4100]
    assert 20 * np.log10(above_old_nyquist.max() / spectrum.max()) < -60


def test_fit_length_centres_a_short_clip_between_zeros():
    clip = np.arange(1, 6, dtype=np.float32)

    fitted = fit_length(clip, 10)

    np.testing.assert_array_equal(fitted, [0, 0, 1, 2, 3, 4, 5, 0, 0, 0])


def test_fit_length_keeps_the_loudest_stretch_of_a_long_clip(tone):
    # A quiet word at 0.2-0.5 s and a loud one at 1.2-1.5 s: a 0.5 s window can hold only one of them.
    clip = np.zeros(2 * RATE, np.float32)
    quiet, loud = tone(300, 0.3, RATE, 0.1), tone(500, 0.3, RATE, 0.8)
    clip[round(0.2 * RATE) : round(0.5 * RATE)] = quiet
    clip[round(1.2 * RATE) : round(1.5 * RATE)] = loud

    fitted = fit_length(clip, RATE // 2)

    assert len(fitted) == RATE // 2
    energy = np.sum(fitted.astype(np.float64) ** 2)
    assert energy == pytest.approx(np.sum(loud.astype(np.float64) ** 2), rel=1e-9)


def test_loudest_db_is_the_rms_of_the_loudest_window_in_dbfs(tone):
    clip = np.zeros(RATE, dtype=np.float32)
    clip[RATE // 2 : RATE // 2 + RATE // 5] = tone(1000, 0.2, RATE, 0.1)  # RMS 0.1 / sqrt(2): -23.0 dBFS
    assert loudest_db(clip, RATE // 10) == pytest.approx(20 * math.log10(0.1 / math.sqrt(2)), abs=0.01)
    # A window longer than the clip is the whole clip; digital silence has no level.
    assert loudest_db(clip[RATE // 2 : RATE // 2 + 800], RATE) == pytest.approx(-23.0, abs=0.1)
    assert loudest_db(np.zeros(100, dtype=np.float32), 10) == -math.inf


def test_fit_length_returns_a_clip_of_the_right_length_unchanged(noise):
    clip = noise(1.0, RATE)

    np.testing.assert_array_equal(fit_length(clip, RATE), clip)


def test_load_audio_pads_a_short_file_to_num_samples_with_the_sound_centred(tmp_path, write_wav, tone):
    signal = tone(440, 0.5, RATE, 0.5)
    path = write_wav(tmp_path / "short.wav", signal, RATE, "FLOAT")

    waveform = load_audio(path, RATE, num_samples=RATE)

    assert len(waveform) == RATE
    np.testing.assert_array_equal(waveform[: RATE // 4], 0)
    np.testing.assert_array_equal(waveform[RATE // 4 : 3 * RATE // 4], signal)
    np.testing.assert_array_equal(waveform[3 * RATE // 4 :], 0)


def test_offset_and_duration_read_exactly_that_part_of_the_file(tmp_path, write_wav):
    # Every sample holds its own index, so the part read says where it came from.
    ramp = (np.arange(RATE) / RATE).astype(np.float32)
    path = write_wav(tmp_path / "ramp.wav", ramp, RATE, "FLOAT")

    part = load_audio(path, RATE, offset_s=0.25, duration_s=0.5)

    np.testing.assert_array_equal(part, ramp[4000:12000])


def test_a_duration_past_the_end_of_the_file_reads_up_to_the_end(tmp_path, write_wav):
    ramp = (np.arange(RATE) / RATE).astype(np.float32)
    path = write_wav(tmp_path / "ramp.wav", ramp, RATE, "FLOAT")

    part = load_audio(path, RATE, offset_s=0.75, duration_s=1.0)

    np.testing.assert_array_equal(part, ramp[12000:])


def test_read_info_reports_the_header(tmp_path, write_wav, tone):
    path = write_wav(tmp_path / "info.flac", np.stack([tone(440, 0.5, 22050)] * 2, axis=1), 22050, "PCM_24")

    info = read_info(path)

    assert (info.sample_rate, info.frames, info.channels) == (22050, 11025, 2)
    assert (info.format, info.subtype) == ("FLAC", "PCM_24")
    assert info.duration_s == pytest.approx(0.5)


def write_truncated_wav(folder, write_wav, tone):
    valid = write_wav(folder / "valid.wav", tone(440, 0.5, RATE), RATE).read_bytes()
    path = folder / "truncated.wav"
    path.write_bytes(valid[: len(valid) // 2])
    return path


def write_header_only_wav(folder, write_wav, tone):
    """The first 44 bytes of a valid file: a header that promises samples that are not there."""
    valid = write_wav(folder / "valid.wav", tone(440, 0.5, RATE), RATE).read_bytes()
    path = folder / "header_only.wav"
    path.write_bytes(valid[:44])
    return path


def write_wav_with_no_samples(folder, write_wav, tone):
    return write_wav(folder / "no_samples.wav", np.zeros(0, np.float32), RATE)


def write_float_wav_with_nan(folder, write_wav, tone):
    signal = tone(440, 0.5, RATE)
    signal[1000] = np.nan
    return write_wav(folder / "nan.wav", signal, RATE, "FLOAT")


def write_float_wav_with_infinity(folder, write_wav, tone):
    signal = tone(440, 0.5, RATE)
    signal[1000] = np.inf
    return write_wav(folder / "inf.wav", signal, RATE, "FLOAT")


def write_empty_file(folder, write_wav, tone):
    path = folder / "empty.wav"
    path.touch()
    return path


def write_text_file(folder, write_wav, tone):
    path = folder / "notes.wav"
    path.write_text("yes, no, up, down\n" * 20)
    return path


def write_missing_file(folder, write_wav, tone):
    return folder / "missing.wav"


def make_folder(folder, write_wav, tone):
    path = folder / "clips.wav"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make_bad_file", "reason"),
    [
        (write_missing_file, "file not found"),
        (write_empty_file, "empty file (0 bytes)"),
        (write_text_file, "not a readable audio file"),
        (write_truncated_wav, "truncated file"),
        (write_header_only_wav, "truncated file"),
        (write_wav_with_no_samples, "holds no audio samples"),
        (write_float_wav_with_nan, "NaN"),
        (write_float_wav_with_infinity, "infinite"),
        (make_folder, "is a folder"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_bad_file_raises_audio_error_naming_the_file_and_the_reason(tmp_path, write_wav, tone, make_bad_file, reason):
    path = make_bad_file(tmp_path, write_wav, tone)

    with pytest.raises(AudioError) as raised:
        load_audio(path, RATE)

    assert str(path) in str(raised.value)
    assert reason in str(raised.value)


def test_an_offset_at_the_end_of_the_file_raises_audio_error(tmp_path, write_wav, tone):
    path = write_wav(tmp_path / "clip.wav", tone(440, 0.5, RATE), RATE)

    with pytest.raises(AudioError, match="holds no audio samples"):
        load_audio(path, RATE, offset_s=0.5)


def test_real_speech_commands_clips_load_as_one_second_at_16khz(shared_data):
    clips = sorted((shared_data / "speech_commands" / "yes").glob("*.wav"))[:5]
    if not clips:
        pytest.skip("no speech_commands/yes clips in the real data")

    for path in clips:
        waveform = load_audio(path, RATE, num_samples=RATE)
        assert waveform.dtype == np.float32 and waveform.shape == (RATE,)
        assert np.isfinite(waveform).all() and np.abs(waveform).max() <= 1.0
