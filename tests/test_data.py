"""Datasets: Speech Commands, FSDD, manifests and one-word folders become labelled, split clips."""

import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from kws.config import DataConfig, ExtraWords
from kws.data import (
    NEAR_DIGITAL_SILENCE_DB,
    NOISE_SPLIT_SPANS,
    SILENCE,
    UNKNOWN,
    load_clip,
    load_dataset,
    negative_speech_files,
    summarize,
    summary_table,
    which_set,
)
from kws.errors import ConfigError, DataError

RATE = 16000
NOISE_S = 12.0
# Two speakers per held-out split, four for training; every speaker says every word once.
VALIDATION_SPEAKERS = ("0a1b2c3d", "1b2c3d4e")
TESTING_SPEAKERS = ("2c3d4e5f", "3d4e5f60")
TRAINING_SPEAKERS = ("4e5f6071", "5f607182", "60718293", "718293a4")
SPEAKERS = VALIDATION_SPEAKERS + TESTING_SPEAKERS + TRAINING_SPEAKERS
WORD_RATES = {"yes": 16000, "no": 16000, "up": 8000}  # `up` is recorded at 8 kHz
CLIP_S = 0.1


def sine(frequency_hz: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


def make_speech_commands(root: Path, write_wav, with_lists: bool = True) -> Path:
    """yes/, no/, up/ with one 0.1 s clip per speaker, two 12 s noise recordings, and split lists."""
    for word_index, (word, rate) in enumerate(WORD_RATES.items()):
        for speaker_index, speaker in enumerate(SPEAKERS):
            samples = sine(200 + 50 * speaker_index + 20 * word_index, CLIP_S, rate)
            write_wav(root / word / f"{speaker}_nohash_0.wav", samples, rate)
    noise = np.random.default_rng(0)
    write_wav(root / "_background_noise_" / "hum.wav", 0.1 * noise.standard_normal(int(NOISE_S * RATE)), RATE)
    write_wav(root / "_background_noise_" / "hiss.wav", 0.05 * noise.standard_normal(int(NOISE_S * 8000)), 8000)
    if with_lists:
        for name, speakers in (("validation_list.txt", VALIDATION_SPEAKERS), ("testing_list.txt", TESTING_SPEAKERS)):
            lines = [f"{word}/{speaker}_nohash_0.wav" for word in WORD_RATES for speaker in speakers]
            (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def speech_commands(tmp_path, write_wav) -> Path:
    return make_speech_commands(tmp_path / "speech_commands", write_wav)


def speakers_by_split(clips) -> dict[str, set[str]]:
    found = defaultdict(set)
    for clip in clips:
        if clip.label != SILENCE:
            found[clip.speaker].add(clip.split)
    return found


# Speech Commands layout


def test_speech_commands_labels_are_silence_unknown_then_the_keywords(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no")), speech_commands)
    assert dataset.layout == "speech_commands"
    assert dataset.labels == (SILENCE, UNKNOWN, "yes", "no")


def test_speech_commands_words_that_are_not_keywords_become_unknown(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no")), speech_commands)
    up_clips = [clip for clip in dataset.clips if clip.path.parent.name == "up"]
    assert len(up_clips) == len(SPEAKERS)
    assert {clip.label for clip in up_clips} == {UNKNOWN}
    assert {clip.label for clip in dataset.clips if clip.path.parent.name == "yes"} == {"yes"}


def test_speech_commands_without_unknown_drops_other_words(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no"), unknown=False), speech_commands)
    assert dataset.labels == (SILENCE, "yes", "no")
    assert not [clip for clip in dataset.clips if clip.path.parent.name == "up"]


def test_reversed_unknown_adds_each_training_keyword_clip_played_backwards(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no"), reversed_unknown=True), speech_commands)
    reversed_clips = [clip for clip in dataset.clips if clip.reversed]
    training_keywords = [c for c in dataset.clips if c.label in ("yes", "no") and c.split == "training"]
    assert sorted(c.path for c in reversed_clips) == sorted(c.path for c in training_keywords)
    assert {(c.label, c.split) for c in reversed_clips} == {(UNKNOWN, "training")}
    clip = reversed_clips[0]
    forward = load_clip(replace(clip, reversed=False), RATE, round(CLIP_S * RATE))
    np.testing.assert_array_equal(load_clip(clip, RATE, round(CLIP_S * RATE)), forward[::-1])


def test_extra_unknown_folders_add_every_recording_as_training_unknown(speech_commands, tmp_path, write_wav):
    others = tmp_path / "other_speech"
    for speaker in SPEAKERS:
        write_wav(others / "hello" / f"{speaker}_nohash_0.wav", sine(700, CLIP_S, RATE), RATE)
    write_wav(others / "_background_noise_" / "room.wav", sine(50, 1.0, RATE), RATE)
    config = DataConfig(words=("yes", "no"), unknown=False, extra_unknown=(str(others),))
    dataset = load_dataset(config, speech_commands)
    extra = [clip for clip in dataset.clips if clip.path.is_relative_to(others)]
    assert len(extra) == len(SPEAKERS) and {clip.label for clip in extra} == {UNKNOWN}
    assert UNKNOWN in dataset.labels
    assert {clip.split for clip in extra} == {"training"}


def test_speech_commands_default_words_are_the_standard_keywords_present(speech_commands):
    dataset = load_dataset(DataConfig(), speech_commands)
    assert dataset.labels == (SILENCE, "yes", "no", "up")


def test_speech_commands_splits_follow_the_lists(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no")), speech_commands)
    expected = {speaker: "validation" for speaker in VALIDATION_SPEAKERS}
    expected |= {speaker: "testing" for speaker in TESTING_SPEAKERS}
    expected |= {speaker: "training" for speaker in TRAINING_SPEAKERS}
    spoken = [clip for clip in dataset.clips if clip.label != SILENCE]
    assert len(spoken) == 3 * len(SPEAKERS)
    assert {clip.path.name: clip.split for clip in spoken} == {
        f"{speaker}_nohash_0.wav": split for speaker, split in expected.items()
    }
    assert {clip.speaker for clip in spoken} == set(SPEAKERS)


def test_silence_clips_per_split_are_silence_fraction_of_that_splits_word_clips(speech_commands):
    # 12 training, 6 validation and 6 testing word clips (unknown included).
    dataset = load_dataset(DataConfig(words=("yes", "no"), silence_fraction=0.5), speech_commands)
    silence = Counter(clip.split for clip in dataset.clips if clip.label == SILENCE)
    assert silence == {"training": 6, "validation": 3, "testing": 3}
    assert len(dataset.noise_files) == 2


def test_without_noise_recordings_there_is_no_silence_label(tmp_path, write_wav):
    root = make_speech_commands(tmp_path / "sc", write_wav)
    for path in (root / "_background_noise_").iterdir():
        path.unlink()
    dataset = load_dataset(DataConfig(words=("yes",)), root)
    assert dataset.labels == (UNKNOWN, "yes")
    assert SILENCE not in {clip.label for clip in dataset.clips}


def test_silence_crops_lie_inside_their_splits_span_of_the_noise_recording(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no"), silence_fraction=3.0), speech_commands)
    silence = [clip for clip in dataset.clips if clip.label == SILENCE]
    assert {clip.path.name for clip in silence} == {"hum.wav", "hiss.wav"}
    for clip in silence:
        first, last = NOISE_SPLIT_SPANS[clip.split]
        # Crops are one second long; no second of noise is heard in two splits.
        assert first * NOISE_S <= clip.start_s
        assert clip.start_s + 1.0 <= last * NOISE_S + 1e-3, clip


def test_silence_levels_lie_in_the_range_or_at_near_digital_silence(speech_commands):
    config = DataConfig(words=("yes", "no"), silence_fraction=10.0, silence_db_range=(-60.0, -40.0))
    dataset = load_dataset(config, speech_commands)
    levels = [clip.level_db for clip in dataset.clips if clip.label == SILENCE]
    assert len(levels) == 240
    near_digital = [level for level in levels if level == NEAR_DIGITAL_SILENCE_DB]
    assert all(-60.0 <= level <= -40.0 for level in levels if level != NEAR_DIGITAL_SILENCE_DB)
    assert 0.03 < len(near_digital) / len(levels) < 0.2  # about one in ten


def test_silence_clips_are_the_same_for_the_same_seed_and_differ_for_another(speech_commands):
    def silence(seed):
        dataset = load_dataset(DataConfig(words=("yes",), seed=seed), speech_commands)
        return [clip for clip in dataset.clips if clip.label == SILENCE]

    assert silence(0) == silence(0)
    assert silence(0) != silence(1)


def test_loaded_silence_clip_has_the_rms_its_level_says(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no"), silence_fraction=0.5, seed=3), speech_commands)
    silence = [clip for clip in dataset.clips if clip.label == SILENCE]
    assert {clip.path.name for clip in silence} == {"hum.wav", "hiss.wav"}
    for clip in silence:
        waveform = load_clip(clip, RATE, RATE)
        assert waveform.shape == (RATE,) and waveform.dtype == np.float32
        rms_db = 20 * np.log10(np.sqrt(np.mean(waveform.astype(np.float64) ** 2)))
        assert rms_db == pytest.approx(clip.level_db, abs=0.01)


def test_without_lists_the_split_follows_which_set_and_each_speaker_is_in_one_split(tmp_path, write_wav):
    root = make_speech_commands(tmp_path / "sc", write_wav, with_lists=False)
    config = DataConfig(words=("yes", "no"), validation_percent=30, testing_percent=30)
    dataset = load_dataset(config, root)
    spoken = [clip for clip in dataset.clips if clip.label != SILENCE]
    for clip in spoken:
        assert clip.split == which_set(clip.path.name, 30, 30)
    splits = speakers_by_split(spoken)
    assert all(len(found) == 1 for found in splits.values())
    assert len({split for found in splits.values() for split in found}) > 1


def test_without_lists_held_out_speakers_choose_the_split(tmp_path, write_wav):
    root = make_speech_commands(tmp_path / "sc", write_wav, with_lists=False)
    config = DataConfig(words=("yes",), validation_speakers=("0a1b2c3d",), testing_speakers=("2c3d4e5f",))
    spoken = [clip for clip in load_dataset(config, root).clips if clip.label != SILENCE]
    assert {clip.speaker for clip in spoken if clip.split == "validation"} == {"0a1b2c3d"}
    assert {clip.speaker for clip in spoken if clip.split == "testing"} == {"2c3d4e5f"}


def test_missing_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(), tmp_path / "nowhere")


def test_missing_word_folder_is_a_data_error_naming_the_word(speech_commands):
    with pytest.raises(DataError, match=r"no folder for word\(s\) cat"):
        load_dataset(DataConfig(words=("yes", "cat")), speech_commands)


# TensorFlow's which_set


def tensorflow_which_set(filename: str, validation_percent: float, testing_percent: float) -> str:
    """TensorFlow's speech_commands/input_data.py rule, written out again from its description."""
    speaker = Path(filename).name.split("_nohash_")[0]
    bucket = int.from_bytes(hashlib.sha1(speaker.encode("utf-8")).digest(), "big") & (2**27 - 1)
    percent = bucket * 100.0 / (2**27 - 1)
    if percent < validation_percent:
        return "validation"
    if percent < validation_percent + testing_percent:
        return "testing"
    return "training"


@pytest.mark.parametrize(
    "name",
    ["0a7c2a8d_nohash_0.wav", "yes/0a7c2a8d_nohash_3.wav", "b0ae6326_nohash_1.wav", "ffd2ba2f_nohash_4.wav",
     "c1d39ce8_nohash_0.wav", "3cfc6b3a_nohash_2.wav", "recording.wav"],
)  # fmt: skip
@pytest.mark.parametrize("percents", [(10, 10), (30, 30), (0, 50), (45, 45)])
def test_which_set_agrees_with_tensorflows_rule(name, percents):
    assert which_set(name, *percents) == tensorflow_which_set(name, *percents)


def test_which_set_matches_a_hand_checked_hash():
    # sha1("abc") = a9993e36...9cd0d89d; its low 27 bits are 0x4d0d89d = 80795805,
    # and 80795805 * 100 / (2**27 - 1) = 60.1976 percent.
    assert which_set("abc_nohash_0.wav", 10, 10) == "training"
    assert which_set("abc_nohash_7.wav", 60.1, 0) == "training"
    assert which_set("abc_nohash_0.wav", 60.3, 0) == "validation"
    assert which_set("abc_nohash_0.wav", 50, 10.3) == "testing"
    assert which_set("abc_nohash_0.wav", 50, 10.1) == "training"


# FSDD layout


@pytest.fixture
def fsdd(tmp_path, write_wav) -> Path:
    for speaker in ("alice", "bob", "carol", "dave"):
        for digit in range(3):
            for index in range(2):
                samples = sine(300 + 100 * digit, 0.05, 8000)
                write_wav(tmp_path / "fsdd" / "recordings" / f"{digit}_{speaker}_{index}.wav", samples, 8000)
    return tmp_path / "fsdd"


def test_fsdd_holds_out_the_last_speaker_for_testing_and_the_one_before_for_validation(fsdd):
    dataset = load_dataset(DataConfig(), fsdd)
    assert dataset.layout == "fsdd"
    assert dataset.labels == ("0", "1", "2")
    assert len(dataset.clips) == 24
    splits = speakers_by_split(dataset.clips)
    assert splits == {"alice": {"training"}, "bob": {"training"}, "carol": {"validation"}, "dave": {"testing"}}


def test_fsdd_explicit_held_out_speakers_choose_the_splits(fsdd):
    config = DataConfig(validation_speakers=("alice",), testing_speakers=("bob",))
    dataset = load_dataset(config, fsdd / "recordings")
    splits = speakers_by_split(dataset.clips)
    assert splits == {"alice": {"validation"}, "bob": {"testing"}, "carol": {"training"}, "dave": {"training"}}
    clip = next(clip for clip in dataset.clips if clip.path.name == "2_carol_1.wav")
    assert (clip.label, clip.speaker, clip.split) == ("2", "carol", "training")


def test_fsdd_digits_that_are_not_words_become_unknown(fsdd):
    dataset = load_dataset(DataConfig(words=("0", "1")), fsdd)
    assert dataset.labels == (UNKNOWN, "0", "1")
    assert Counter(clip.label for clip in dataset.clips) == {"0": 8, "1": 8, UNKNOWN: 8}


def test_extra_words_add_training_clips_of_other_speakers_under_the_recipes_labels(fsdd, speech_commands):
    borrowed = ExtraWords(str(speech_commands), words=("yes", "no"), labels=("1", "2"))
    dataset = load_dataset(DataConfig(extra_words=(borrowed,)), fsdd)
    extra = [clip for clip in dataset.clips if clip.path.is_relative_to(speech_commands)]
    assert Counter(clip.label for clip in extra) == {"1": len(SPEAKERS), "2": len(SPEAKERS)}
    assert {clip.split for clip in extra} == {"training"}  # validation and test stay the dataset's own
    assert {clip.speaker for clip in extra} == set(SPEAKERS)
    assert dataset.labels == ("0", "1", "2")


def test_extra_words_heard_at_a_lower_rate_lose_everything_above_half_of_it(fsdd, tmp_path, write_wav):
    rate, samples = 16000, 16000
    t = np.arange(samples) / rate
    both = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    write_wav(tmp_path / "other" / "two" / "abc_nohash_0.wav", both, rate)
    for recorded_rate, high_kept in ((None, True), (8000, False)):
        borrowed = ExtraWords(str(tmp_path / "other"), words=("two",), labels=("2",), sample_rate=recorded_rate)
        (clip,) = [c for c in load_dataset(DataConfig(extra_words=(borrowed,)), fsdd).clips if c.speaker == "abc"]
        spectrum = np.abs(np.fft.rfft(load_clip(clip, rate, samples)))  # 1 Hz per bin
        assert spectrum[1000] > 1000
        assert (spectrum[6000] > 1000) == high_kept
        assert spectrum[6000] < 1 or high_kept


def test_extra_words_problems_are_errors_naming_the_setting_or_folder(fsdd, speech_commands):
    with pytest.raises(ConfigError, match="2 labels for 1 words"):
        ExtraWords(str(speech_commands), words=("yes",), labels=("1", "2"))
    with pytest.raises(DataError, match=r"'up2' is not a word of this dataset \(0, 1, 2\)"):
        load_dataset(DataConfig(extra_words=(ExtraWords(str(speech_commands), ("up",), ("up2",)),)), fsdd)
    with pytest.raises(DataError, match="extra_words folder not found"):
        load_dataset(DataConfig(extra_words=(ExtraWords(str(speech_commands), ("seven",), ("1",)),)), fsdd)


def test_fsdd_unknown_held_out_speaker_is_a_data_error_naming_it(fsdd):
    with pytest.raises(DataError, match="no speaker.*eve"):
        load_dataset(DataConfig(testing_speakers=("eve",)), fsdd)


# Manifests


@pytest.fixture
def clips_folder(tmp_path, write_wav) -> Path:
    for name in ("a1.wav", "a2.wav", "b1.wav", "c1.wav"):
        write_wav(tmp_path / "clips" / name, sine(440, 0.05, RATE), RATE)
    return tmp_path


def test_csv_manifest_paths_are_relative_to_it_and_split_aliases_are_understood(clips_folder):
    manifest = clips_folder / "manifest.csv"
    manifest.write_text(
        "path,label,split,speaker\n"
        "clips/a1.wav,yes,train,ann\n"
        "clips/a2.wav,no,val,ann\n"
        "clips/b1.wav,maybe,test,ben\n"
        f"{clips_folder / 'clips' / 'c1.wav'},yes,dev,cat\n"
    )
    dataset = load_dataset(DataConfig(words=("yes", "no")), manifest)
    assert dataset.layout == "manifest"
    assert dataset.labels == (UNKNOWN, "yes", "no")
    assert [(clip.path, clip.label, clip.split, clip.speaker) for clip in dataset.clips] == [
        (clips_folder / "clips" / "a1.wav", "yes", "training", "ann"),
        (clips_folder / "clips" / "a2.wav", "no", "validation", "ann"),
        (clips_folder / "clips" / "b1.wav", UNKNOWN, "testing", "ben"),
        (clips_folder / "clips" / "c1.wav", "yes", "validation", "cat"),
    ]


def test_jsonl_manifest_reads_one_clip_per_line(clips_folder):
    manifest = clips_folder / "manifest.jsonl"
    rows = [
        {"path": "clips/a1.wav", "label": 1, "split": "training"},
        {"path": "clips/b1.wav", "label": 2, "split": "testing", "speaker": "ben"},
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_dataset(DataConfig(), manifest)
    assert dataset.labels == ("1", "2")
    assert [(clip.path.name, clip.label, clip.split, clip.speaker) for clip in dataset.clips] == [
        ("a1.wav", "1", "training", "a1"),
        ("b1.wav", "2", "testing", "ben"),
    ]


def test_manifest_without_split_column_keeps_every_speaker_in_one_split(tmp_path):
    speakers = [f"speaker{index}" for index in range(12)]
    lines = [f"clips/{speaker}_{n}.wav,yes,{speaker}" for speaker in speakers for n in range(3)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,speaker\n" + "\n".join(lines) + "\n")
    dataset = load_dataset(DataConfig(validation_percent=30, testing_percent=30), manifest)
    splits = speakers_by_split(dataset.clips)
    assert set(splits) == set(speakers)
    assert all(len(found) == 1 for found in splits.values())
    split_of = {speaker: min(found) for speaker, found in splits.items()}
    assert split_of == {speaker: tensorflow_which_set(f"{speaker}_nohash_0.wav", 30, 30) for speaker in speakers}
    assert len(set(split_of.values())) > 1


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        ("m.csv", "path,label\nclips/a1.wav,yes\nclips/a2.wav,\n", 3, "needs a path and a label"),
        ("m.csv", "path,label,split\nclips/a1.wav,yes,train\nclips/a2.wav,no,later\n", 3, "unknown split 'later'"),
        ("m.jsonl", '{"path": "a.wav", "label": "yes"}\n{"path": "b.wav", "label": \n', 2, "not valid JSON"),
        ("m.jsonl", '{"path": "a.wav", "label": "yes"}\n\n{"path": "b.wav"}\n', 3, "needs a path and a label"),
        ("m.jsonl", '{"path": "a.wav", "label": "yes"}\n\n["b.wav", "no"]\n', 3, "needs a path and a label"),
        ("m.jsonl", '\n{"path": "a.wav", "label": "yes", "split": "nope"}\n', 2, "unknown split 'nope'"),
    ],
)  # fmt: skip
def test_bad_manifest_row_is_a_data_error_naming_file_and_line(tmp_path, name, text, line, reason):
    manifest = tmp_path / name
    manifest.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{manifest}:{line}: ") + ".*" + re.escape(reason)):
        load_dataset(DataConfig(), manifest)


def test_manifest_that_is_not_csv_or_jsonl_is_a_data_error(tmp_path):
    manifest = tmp_path / "clips.txt"
    manifest.write_text("a.wav yes\n")
    with pytest.raises(DataError, match="csv or .jsonl"):
        load_dataset(DataConfig(layout="manifest"), manifest)


# One-word folder


def test_a_folder_of_one_words_clips_is_labelled_with_the_folder_name(tmp_path, write_wav):
    root = make_speech_commands(tmp_path / "sc", write_wav, with_lists=False)
    dataset = load_dataset(DataConfig(), root / "yes")
    assert dataset.layout == "folder"
    assert dataset.labels == ("yes",)
    assert len(dataset.clips) == len(SPEAKERS)
    for clip in dataset.clips:
        assert clip.label == "yes"
        assert clip.speaker == clip.path.name.split("_nohash_")[0]
        assert clip.split == tensorflow_which_set(clip.path.name, 10, 10)


def test_a_folder_of_arbitrary_names_is_a_one_word_folder(tmp_path, write_wav):
    for name in ("first.wav", "second take.wav"):
        write_wav(tmp_path / "hello" / name, sine(440, 0.05, RATE), RATE)
    dataset = load_dataset(DataConfig(), tmp_path / "hello")
    assert dataset.layout == "folder"
    assert sorted(clip.path.name for clip in dataset.clips) == ["first.wav", "second take.wav"]


# Summaries


def test_summarize_counts_clips_speakers_seconds_and_sample_rates(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no"), silence_fraction=0.5), speech_commands)
    summary = summarize(dataset, workers=2)
    assert summary.counts == {
        SILENCE: {"training": 6, "validation": 3, "testing": 3},
        UNKNOWN: {"training": 4, "validation": 2, "testing": 2},
        "yes": {"training": 4, "validation": 2, "testing": 2},
        "no": {"training": 4, "validation": 2, "testing": 2},
    }
    assert summary.speakers == {"training": 4, "validation": 2, "testing": 2}
    # 0.1 s per spoken clip, 1 s per silence clip.
    assert summary.duration_s == pytest.approx({"training": 7.2, "validation": 3.6, "testing": 3.6})
    assert summary.sample_rates == {16000: 16, 8000: 8}
    assert summary.unreadable == []


def test_summarize_names_unreadable_files(clips_folder):
    (clips_folder / "clips" / "broken.wav").write_bytes(b"not audio at all")
    manifest = clips_folder / "m.csv"
    manifest.write_text("path,label,split\nclips/a1.wav,yes,train\nclips/broken.wav,yes,test\n")
    summary = summarize(load_dataset(DataConfig(), manifest))
    assert summary.counts == {"yes": {"training": 1, "validation": 0, "testing": 1}}
    assert summary.duration_s == pytest.approx({"training": 0.05, "validation": 0.0, "testing": 0.0})
    assert len(summary.unreadable) == 1 and "broken.wav" in summary.unreadable[0]


def test_summary_table_shows_a_row_per_class_and_the_totals(speech_commands):
    dataset = load_dataset(DataConfig(words=("yes", "no"), silence_fraction=0.5), speech_commands)
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(summary_table(dataset, summarize(dataset), title="tiny"))
    text = console.export_text()
    rows = {}
    for line in text.splitlines():
        cells = [cell for cell in re.split(r"[\s│┃|]+", line) if cell]
        if cells:
            rows[cells[0]] = cells[1:]
    assert rows[SILENCE] == ["6", "3", "3", "12"]
    assert rows["yes"] == ["4", "2", "2", "8"]
    assert rows["clips"] == ["18", "9", "9", "36"]
    assert rows["speakers"] == ["4", "2", "2", "8"]
    assert rows["minutes"] == ["0.1", "0.1", "0.1", "0.2"]
    assert "tiny" in rows and "sample rates: 8000 Hz x 8, 16000 Hz x 16" in text


@pytest.mark.parametrize("setting", ["extra_unknown", "negative_speech"])
def test_borrowed_folders_holding_the_datasets_held_out_recordings_are_an_error_naming_one(words_folder, setting):
    config = DataConfig(words=("yes", "no"), **{setting: (str(words_folder / "cat"),)})
    with pytest.raises(DataError, match=rf"data.{setting}.*6 borrowed file.*cat/spk4_nohash_0.wav \(validation"):
        negative_speech_files(config, load_dataset(config, words_folder))


def test_extra_words_from_the_datasets_own_held_out_recordings_are_an_error(words_folder):
    extra = ExtraWords(path=str(words_folder), words=("cat",), labels=("yes",))
    with pytest.raises(DataError, match="extra_words.* 6 borrowed file"):
        load_dataset(DataConfig(words=("yes", "no"), extra_words=(extra,)), words_folder)


def test_borrowed_training_recordings_of_the_dataset_are_allowed(words_folder, tmp_path):
    training_only = tmp_path / "spk0_cats"
    training_only.mkdir()
    (training_only / "spk0_nohash_0.wav").write_bytes((words_folder / "cat" / "spk0_nohash_0.wav").read_bytes())
    config = DataConfig(words=("yes", "no"), negative_speech=(str(training_only),))
    assert negative_speech_files(config, load_dataset(config, words_folder)) == [training_only / "spk0_nohash_0.wav"]


def test_a_speaker_in_two_splits_of_given_lists_is_a_warning_naming_them(words_folder):
    assert load_dataset(DataConfig(words=("yes", "no")), words_folder).warnings == ()
    with open(words_folder / "testing_list.txt", "a") as lists:
        lists.write("yes/spk0_nohash_1.wav\n")
    (warning,) = load_dataset(DataConfig(words=("yes", "no")), words_folder).warnings
    assert warning.startswith("1 speaker(s) in two splits: spk0 (testing/training)")


def test_a_speaker_in_two_splits_of_a_manifest_is_a_warning(tmp_path, write_wav, tone):
    rows = ["path,label,split,speaker"]
    for index, split in enumerate(("training", "validation", "testing", "training")):
        write_wav(tmp_path / f"clip{index}.wav", tone(440, 0.5), 16000)
        rows.append(f"clip{index}.wav,yes,{split},{'ann' if index < 2 else f'other{index}'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (warning,) = load_dataset(DataConfig(silence_fraction=0.0), tmp_path / "manifest.csv").warnings
    assert "ann (training/validation)" in warning and "other" not in warning
