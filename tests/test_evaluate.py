"""Evaluation: accuracy, per-class precision / recall / F1 and confusion against hand-computed examples."""

import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import kws.models
from kws.checkpoint import ModelInfo, save_checkpoint
from kws.cli import app
from kws.config import FeatureConfig
from kws.data import Clip
from kws.evaluate import (
    confusion_table,
    dataset_config_for,
    evaluate_dataset,
    evaluate_waveforms,
    plot_confusion,
    report_from_predictions,
    report_table,
)
from kws.models import predict_probabilities

FEATURES = FeatureConfig(clip_s=0.5)

# Three classes and one that never occurs. True class per clip, and what a model predicted:
#   a: a a b c   b: b a   c: c c c b
TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDICTED = [0, 0, 1, 2, 1, 0, 2, 2, 2, 1]
LABELS = ("a", "b", "c", "d")


@pytest.fixture
def report():
    return report_from_predictions(np.array(TRUE), np.array(PREDICTED), LABELS)


def test_report_counts_each_true_and_predicted_class_pair(report):
    assert report.confusion.tolist() == [[2, 1, 1, 0], [1, 1, 0, 0], [0, 1, 3, 0], [0, 0, 0, 0]]
    assert report.support.tolist() == [4, 2, 4, 0]


def test_report_accuracy_precision_recall_and_f1_are_those_worked_out_by_hand(report):
    assert report.accuracy == pytest.approx(6 / 10)
    # precision: right / predicted as the class; recall: right / clips of the class; F1: their harmonic mean.
    np.testing.assert_allclose(report.precision, [2 / 3, 1 / 3, 3 / 4, 0])
    np.testing.assert_allclose(report.recall, [2 / 4, 1 / 2, 3 / 4, 0])
    np.testing.assert_allclose(report.f1, [4 / 7, 2 / 5, 3 / 4, 0])


def test_report_as_a_dict_holds_every_figure_by_class(report):
    values = json.loads(json.dumps(report.to_dict()))
    assert values["accuracy"] == pytest.approx(0.6) and values["clips"] == 10
    assert values["labels"] == list(LABELS)
    assert values["confusion"] == report.confusion.tolist()
    assert values["per_class"]["b"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert values["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_a_report_on_no_clips_has_zero_accuracy():
    report = report_from_predictions(np.zeros(0, int), np.zeros(0, int), ("a", "b"))
    assert report.accuracy == 0.0 and report.confusion.sum() == 0


def rendered(table) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()


def cells(text: str, first: str) -> list[str]:
    """The cells of the last table row starting with `first` (the confusion table's header starts with `a` too)."""
    rows = [[cell for cell in re.split(r"[\s│┃|]+", line) if cell] for line in text.splitlines()]
    matching = [row[1:] for row in rows if row and row[0] == first]
    assert matching, f"no row {first!r} in\n{text}"
    return matching[-1]


def test_report_table_shows_accuracy_and_each_class_in_percent(report):
    text = rendered(report_table(report, "held-out speakers"))
    assert "held-out speakers: accuracy 60.00% on 10 clips" in " ".join(text.split())
    assert cells(text, "a") == ["66.7", "50.0", "57.1", "4"]
    assert cells(text, "c") == ["75.0", "75.0", "75.0", "4"]
    assert cells(text, "d") == ["0.0", "0.0", "0.0", "0"]


def test_confusion_table_shows_the_counts_with_true_classes_as_rows(report):
    text = rendered(confusion_table(report))
    assert cells(text, "a") == ["2", "1", "1", "0"]
    assert cells(text, "c") == ["0", "1", "3", "0"]


def test_plot_confusion_writes_a_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    plot_confusion(report, tmp_path / "confusion.png", "a title")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class LoudnessNet(nn.Module):
    """Says class 1 ("loud") when a clip's RMS is above `threshold`, else class 0: predictions a test
    can work out by hand. Registered as an architecture, it is saved and loaded like any model."""

    def __init__(self, num_classes: int, features: FeatureConfig, threshold: float = 0.1) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        rms = waveform.square().mean(dim=1).sqrt()
        return torch.stack([self.threshold - rms, rms - self.threshold], dim=1)


def test_batched_probabilities_equal_one_clip_at_a_time_and_the_mode_is_restored(noise):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(800, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    waveforms = torch.from_numpy(np.stack([noise(0.05, seed=seed) for seed in range(7)]))
    batched = predict_probabilities(model, waveforms, batch_size=3)
    assert model.training
    model.eval()
    with torch.no_grad():
        one_by_one = torch.cat([torch.softmax(model(clip[None]), dim=1) for clip in waveforms])
    torch.testing.assert_close(batched, one_by_one)
    torch.testing.assert_close(batched.sum(dim=1), torch.ones(7))


def test_evaluate_waveforms_scores_the_models_predictions(tone):
    quiet, loud = tone(440, 0.5, amplitude=0.01), tone(440, 0.5, amplitude=0.5)
    waveforms = torch.from_numpy(np.stack([quiet, loud, loud, quiet]))
    report = evaluate_waveforms(LoudnessNet(2, FEATURES), waveforms, torch.tensor([0, 1, 0, 0]), ("quiet", "loud"))
    assert report.confusion.tolist() == [[2, 1], [0, 1]]


def test_evaluate_dataset_skips_an_unreadable_file_and_reports_it(tmp_path, write_wav, tone):
    clips = [
        Clip(write_wav(tmp_path / "quiet.wav", tone(440, 0.3, amplitude=0.02), 16000), "quiet", "testing", "s1"),
        Clip(write_wav(tmp_path / "loud.wav", tone(440, 0.3, amplitude=0.5), 16000), "loud", "testing", "s1"),
        Clip(tmp_path / "broken.wav", "loud", "testing", "s2"),
        Clip(write_wav(tmp_path / "soft.wav", tone(440, 0.3, amplitude=0.02), 8000), "loud", "testing", "s3"),
    ]
    (tmp_path / "broken.wav").write_bytes(b"RIFF, but nothing after it")
    progress, skipped_lines = [], []
    report, skipped = evaluate_dataset(
        LoudnessNet(2, FEATURES), ("quiet", "loud"), clips, FEATURES, workers=2,
        on_progress=progress.append, on_skip=skipped_lines.append,
    )  # fmt: skip
    assert len(skipped) == 1 and str(tmp_path / "broken.wav") in skipped[0]
    assert skipped_lines == skipped
    assert sum(progress) == 4
    assert report.confusion.tolist() == [[1, 0], [1, 1]]  # the soft clip labelled loud is heard as quiet
    [mistake] = report.mistakes
    assert (mistake.clip, mistake.true, mistake.predicted) == (clips[3], "loud", "quiet")
    assert mistake.probability > 0.5 > mistake.true_probability
    assert mistake.to_dict() == {
        "path": str(clips[3].path), "label": "loud", "speaker": "s3", "true": "loud", "predicted": "quiet",
        "probability": round(mistake.probability, 4), "true_probability": round(mistake.true_probability, 4),
        "loudest_db": pytest.approx(20 * math.log10(0.02 / math.sqrt(2)), abs=0.1),  # a sine of amplitude 0.02
    }  # fmt: skip


def test_evaluate_dataset_with_no_readable_file_gives_an_empty_report(tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"")
    clips = [Clip(tmp_path / "broken.wav", "loud", "testing", "s1")]
    report, skipped = evaluate_dataset(LoudnessNet(2, FEATURES), ("quiet", "loud"), clips, FEATURES)
    assert report.confusion.tolist() == [[0, 0], [0, 0]] and len(skipped) == 1


def test_dataset_config_for_a_model_reads_its_keywords_and_classes():
    recipe = {"data": {"path": "/somewhere", "words": ["up"], "silence_fraction": 0.2, "seed": 3}}
    only_own = {"extra_unknown": [], "extra_words": [], "reversed_unknown": False}
    assert dataset_config_for(recipe, ("_silence_", "_unknown_", "yes", "no")) == {
        "path": None, "words": ["yes", "no"], "unknown": True, "silence_fraction": 0.2, "seed": 3, **only_own,
    }  # fmt: skip
    assert dataset_config_for(recipe, ("yes", "no")) == {
        "path": None, "words": ["yes", "no"], "unknown": False, "silence_fraction": 0.0, "seed": 3, **only_own,
    }  # fmt: skip


def test_dataset_config_for_a_model_leaves_out_clips_borrowed_for_training():
    borrowed = {"path": "/training/machine/other", "words": ["zero"], "labels": ["0"], "sample_rate": 8000}
    recipe = {"data": {"extra_words": [borrowed], "extra_unknown": ["/training/machine/speech"]}}
    config = dataset_config_for(recipe, ("0", "1"))
    assert (config["extra_words"], config["extra_unknown"]) == ([], [])


def run(*args: str | Path):
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def loudness_model(tmp_path, monkeypatch) -> Path:
    """A LoudnessNet checkpoint for the classes quiet and loud."""
    monkeypatch.setitem(kws.models.ARCHITECTURES, "loudness", LoudnessNet)
    path = tmp_path / "loudness.safetensors"
    recipe = {"data": {"words": ["quiet", "loud"], "silence_fraction": 0.0}}
    save_checkpoint(path, LoudnessNet(2, FEATURES), ModelInfo("loudness", {}, FEATURES, ("quiet", "loud"), recipe))
    return path


@pytest.fixture
def loudness_folder(tmp_path, write_wav, tone) -> Path:
    """quiet/ and loud/ words of three speakers; the testing speaker's second loud clip is soft."""
    root = tmp_path / "levels"
    for speaker in ("s1", "s2", "s3"):
        for index in range(2):
            soft = speaker == "s3" and index == 1
            write_wav(root / "quiet" / f"{speaker}_nohash_{index}.wav", tone(300, 0.3, amplitude=0.02), 16000)
            write_wav(root / "loud" / f"{speaker}_nohash_{index}.wav", tone(300, 0.3, amplitude=0.02 if soft else 0.5),
                      16000)  # fmt: skip
    (root / "testing_list.txt").write_text("".join(f"{word}/s3_nohash_{i}.wav\n" for word in ("quiet", "loud")
                                                   for i in range(2)))  # fmt: skip
    return root


def test_kws_evaluate_writes_the_report_worked_out_by_hand_as_json(loudness_model, loudness_folder, tmp_path):
    code, stdout, stderr = run("evaluate", loudness_model, loudness_folder, "--json", tmp_path / "report.json",
                               "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "testing" and report["labels"] == ["quiet", "loud"]
    assert report["confusion"] == [[2, 0], [1, 1]]
    assert report["accuracy"] == pytest.approx(3 / 4)
    assert "accuracy 75.00% on 4 clips" in stderr
    # The soft clip labelled loud, by name, in the JSON and in the table of mistakes.
    [mistake] = report["mistakes"]
    assert mistake["path"] == str(loudness_folder / "loud" / "s3_nohash_1.wav")
    assert (mistake["true"], mistake["predicted"]) == ("loud", "quiet")
    assert "the 1 surest of 1 mistakes" in stderr and "loud/s3_nohash_1.wav" in stderr
    assert mistake["loudest_db"] == pytest.approx(-37.0, abs=0.1) and "-37 dB" in stderr  # a sine of amplitude 0.02


def test_kws_evaluate_of_all_splits_counts_every_clip(loudness_model, loudness_folder, tmp_path):
    code, _, stderr = run("evaluate", loudness_model, loudness_folder, "--split", "all", "--json",
                          tmp_path / "report.json")  # fmt: skip
    assert code == 0, stderr
    assert json.loads((tmp_path / "report.json").read_text())["confusion"] == [[6, 0], [1, 5]]


def test_kws_evaluate_of_all_of_a_dataset_of_new_speakers_needs_none_of_the_recipes_speakers(
    tmp_path, monkeypatch, write_wav, tone
):
    """A model trained on FSDD with nicolas and theo held out, scored on recordings of two other people."""
    monkeypatch.setitem(kws.models.ARCHITECTURES, "loudness", LoudnessNet)
    model = tmp_path / "digits.safetensors"
    recipe = {"data": {"layout": "fsdd", "silence_fraction": 0.0, "validation_speakers": ["nicolas"],
                       "testing_speakers": ["theo"]}}  # fmt: skip
    save_checkpoint(model, LoudnessNet(2, FEATURES), ModelInfo("loudness", {}, FEATURES, ("0", "1"), recipe))
    others = tmp_path / "others"
    for speaker in ("ann", "bo"):
        write_wav(others / f"0_{speaker}_0.wav", tone(300, 0.3, amplitude=0.02), 16000)
        write_wav(others / f"1_{speaker}_0.wav", tone(300, 0.3, amplitude=0.5), 16000)
    code, _, stderr = run("evaluate", model, others, "--split", "testing")
    assert code == 2 and "no speaker(s) nicolas, theo" in stderr
    code, _, stderr = run("evaluate", model, others, "--split", "all", "--json", tmp_path / "report.json")
    assert code == 0, stderr
    assert json.loads((tmp_path / "report.json").read_text())["confusion"] == [[2, 0], [0, 2]]


def test_kws_evaluate_names_an_unreadable_file_and_exits_1(loudness_model, loudness_folder):
    (loudness_folder / "quiet" / "s3_nohash_0.wav").write_bytes(b"RIFF")
    code, _, stderr = run("evaluate", loudness_model, loudness_folder)
    assert code == 1
    assert any(line.startswith("skipped:") and "s3_nohash_0.wav" in line for line in stderr.splitlines())
    assert "1 file(s) skipped" in stderr


def test_kws_evaluate_png_draws_the_confusion_matrix(loudness_model, loudness_folder, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, stderr = run("evaluate", loudness_model, loudness_folder, "--png", tmp_path / "confusion.png")
    assert code == 0, stderr
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kws_evaluate_png_without_matplotlib_says_so_in_one_line(
    loudness_model, loudness_folder, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, stderr = run("evaluate", loudness_model, loudness_folder, "--png", tmp_path / "confusion.png")
    assert code == 2
    (error,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "matplotlib" in error
    assert not (tmp_path / "confusion.png").exists()


def test_kws_evaluate_of_a_missing_model_is_one_line_and_exit_2(loudness_folder, tmp_path):
    code, stdout, stderr = run("evaluate", tmp_path / "nothing.safetensors", loudness_folder)
    assert code == 2
    assert stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing.safetensors'}: no such model file, "
                                           "run folder, or shipped model"]  # fmt: skip
    assert stdout == ""


def test_kws_evaluate_of_a_damaged_model_is_one_line_and_exit_2(loudness_model, loudness_folder):
    loudness_model.write_bytes(loudness_model.read_bytes()[:100])
    code, _, stderr = run("evaluate", loudness_model, loudness_folder)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "not a readable checkpoint" in stderr
