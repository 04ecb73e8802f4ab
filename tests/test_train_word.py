"""kws train-word: a keyword model from text alone, with the phrase's own recordings kept out of it."""

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kws.checkpoint import read_info
from kws.cli import app
from kws.errors import ConfigError, KWSError
from kws.synth import installed_engines
from kws.train_word import WordPlan, says_phrase, train_word, voice_splits, write_negatives_without

needs_espeak = pytest.mark.skipif("espeak-ng" not in installed_engines(), reason="espeak-ng is not installed")
TINY = ("model.name=resnet_tiny", "train.epochs=1", "train.batch_size=16", "train.threads=1")


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "split", "speaker", "text"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def negatives(tmp_path, write_wav, noise, tone) -> Path:
    """Speech without keywords, made up: noise bursts in each split, and rows that say `computer`."""
    rows = []
    for index, split in enumerate(["training", "training", "validation", "testing"]):
        write_wav(tmp_path / "neg" / f"talk{index}.wav", noise(2.0, rms=0.05, seed=index), 16000)
        rows.append({"path": f"talk{index}.wav", "label": "sentence", "split": split, "text": "a cup of tea"})
    write_wav(tmp_path / "neg" / "wake.wav", tone(700, 0.8), 16000)
    rows.append({"path": "wake.wav", "label": "computer", "split": "validation", "text": ""})
    rows.append({"path": "wake.wav", "label": "sentence", "split": "testing", "text": "Hey, Computer! lights"})
    return write_manifest(tmp_path / "neg" / "manifest.csv", rows)


def test_rows_that_say_the_phrase_are_left_out_of_the_negatives_and_paths_become_absolute(tmp_path, negatives):
    kept_path = tmp_path / "kept.csv"
    assert write_negatives_without(negatives, kept_path, ["computer"]) == 2
    with kept_path.open() as handle:
        kept = list(csv.DictReader(handle))
    assert [row["path"] for row in kept] == [str(tmp_path / "neg" / f"talk{index}.wav") for index in range(4)]
    assert write_negatives_without(negatives, kept_path, ["jarvis"]) == 0


def test_a_phrase_is_said_by_its_label_or_as_whole_words_of_the_transcript():
    assert says_phrase("smart_mirror", "", ["smart mirror"])
    assert says_phrase("sentence", "Look at the Smart  Mirror, please", ["smart mirror"])
    assert not says_phrase("sentence", "computers are fast", ["computer"])
    assert not says_phrase("alexa", "", ["computer"])


def test_held_out_voices_validate_and_test_and_the_rest_train():
    from kws.synth import Voice

    voices = [Voice("espeak-ng", name) for name in ("en-us", "en-gb+f4", "en-us-nyc+m5", "en-029")]
    assert voice_splits(voices) == {"espeak-en-us": "training", "espeak-en-gb+f4": "validation",
                                    "espeak-en-us-nyc+m5": "testing", "espeak-en-029": "validation"}  # fmt: skip
    assert voice_splits([Voice("piper", "joe"), Voice("festival", "kal")]) == {
        "piper-joe": "training", "festival-kal": "validation"}  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["  "], "an empty phrase"),
        (["computer", "--engines", "espeak-ng,loudspeaker"], "unknown engine(s) loudspeaker"),
        (["r2d2"], "a phrase is words of letters"),
        (["computer", "--init", "no_such_model"], "no_such_model: no such model file"),
    ],
)
def test_bad_input_is_one_line_of_error(tmp_path, negatives, words_folder, arguments, message):
    result = CliRunner().invoke(app, ["train-word", *arguments, "--out", str(tmp_path / "run"), "--negatives",
                                      str(negatives), "--other-words", str(words_folder)])  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    from kws.train_word import _check_plan

    _check_plan(tmp_path / "run", WordPlan(("computer",), variants=2))
    _check_plan(tmp_path / "run", WordPlan(("computer",), variants=2))
    with pytest.raises(KWSError, match="another variants"):
        _check_plan(tmp_path / "run", WordPlan(("computer",), variants=3))


@needs_espeak
def test_train_word_starts_from_speech_commands_and_refuses_another_network_before_synthesis(tmp_path):
    assert WordPlan(("computer",)).init == "speech_commands12"  # the default
    plan = WordPlan(("computer",), overrides=TINY)  # a resnet_tiny cannot start from the shipped resnet_small
    with pytest.raises(ConfigError, match="--init speech_commands12: a resnet_small whose layers do not fit"):
        train_word(plan, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "synth").exists()


def test_train_word_makes_a_calibrated_model_of_the_phrase_without_its_recordings(tmp_path, negatives, words_folder):
    plan = WordPlan(("computer",), str(negatives), str(words_folder), ("espeak-ng",), variants=1,
                    near_miss_count=2, overrides=TINY, init=None)  # fmt: skip
    result = train_word(plan, tmp_path / "run", device="cpu")
    info = read_info(tmp_path / "run")
    assert set(info.labels) == {"computer", "_unknown_", "_silence_"}
    assert dict(info.card["detector"]["settings"]["keyword_thresholds"]).keys() == {"computer"}
    assert info.card["training"]["train_word"]["excluded_recordings_of_the_phrase"] == {"negatives": 2,
                                                                                       "other_words": 0}  # fmt: skip
    assert "test" in info.card and "macs" in info.card
    assert info.card["training"]["train_word"]["plan"]["init"] is None
    assert result.clips["computer"] == 30 and result.clips["near_miss"] == 60  # 10 voices; 2 words, 3 takes
    with (tmp_path / "run" / "data" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert not any("wake.wav" in row["path"] for row in rows)
    assert {row["split"] for row in rows if row["label"] == "computer"} == {"training", "validation", "testing"}
    # Run again: everything is found done, and the same model comes out.
    again = train_word(plan, tmp_path / "run", device="cpu")
    assert again.thresholds == result.thresholds
