"""Scoring a model on labelled clips: accuracy, per-class precision / recall / F1, confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch import nn

from kws.audio import loudest_db
from kws.config import FeatureConfig
from kws.data import SILENCE, UNKNOWN, Clip
from kws.errors import DataError, KWSError
from kws.extract import load_clips
from kws.models import predict_probabilities


@dataclass(frozen=True)
class Mistake:
    """A clip the model got wrong: what it is, what it was called, and how sure the model was."""

    clip: Clip
    true: str  # the class it belongs to (a word the model does not know: _unknown_)
    predicted: str
    probability: float  # of the predicted class
    true_probability: float
    loudest_db: float  # RMS of the clip's loudest 0.1 s as scored, dBFS: below about -60, most likely no audible word

    def to_dict(self) -> dict:
        values = self.clip.to_dict()
        values.pop("split")
        values.update(true=self.true, predicted=self.predicted, probability=round(self.probability, 4),
                      true_probability=round(self.true_probability, 4),
                      loudest_db=round(self.loudest_db, 1) if math.isfinite(self.loudest_db) else None)  # fmt: skip
        return values


@dataclass(frozen=True)
class EvaluationReport:
    """`confusion[i, j]` counts clips of true class i predicted as class j. `mistakes`, when the
    clips are known, names each misclassified one, the most confident first (`Mistake`)."""

    labels: tuple[str, ...]
    confusion: np.ndarray
    mistakes: tuple[Mistake, ...] = ()

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else 0.0

    @property
    def precision(self) -> np.ndarray:
        predicted = self.confusion.sum(axis=0)
        return np.divide(np.diag(self.confusion), predicted, out=np.zeros(len(self.labels)), where=predicted > 0)

    @property
    def recall(self) -> np.ndarray:
        support = self.support
        return np.divide(np.diag(self.confusion), support, out=np.zeros(len(self.labels)), where=support > 0)

    @property
    def f1(self) -> np.ndarray:
        both = self.precision + self.recall
        return np.divide(2 * self.precision * self.recall, both, out=np.zeros(len(self.labels)), where=both > 0)

    def to_dict(self) -> dict:
        per_class = {
            label: {
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "f1": float(self.f1[i]),
                "support": int(self.support[i]),
            }
            for i, label in enumerate(self.labels)
        }
        return {
            "accuracy": self.accuracy,
            "clips": int(self.confusion.sum()),
            "per_class": per_class,
            "labels": list(self.labels),
            "confusion": self.confusion.tolist(),
        }


def report_from_predictions(true: np.ndarray, predicted: np.ndarray, labels: tuple[str, ...]) -> EvaluationReport:
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (np.asarray(true), np.asarray(predicted)), 1)
    return EvaluationReport(tuple(labels), confusion)


def evaluate_waveforms(
    model: nn.Module,
    waveforms: torch.Tensor | Iterable[torch.Tensor],
    targets: torch.Tensor,
    labels: tuple[str, ...],
    device: torch.device | str = "cpu",
) -> EvaluationReport:
    """Score (clips, samples) waveforms, or batches of them in order (e.g. `WaveformStore.batches`, so a
    split on disk is never in memory whole), against `targets`, label indices (clips,)."""
    batches = [waveforms] if isinstance(waveforms, torch.Tensor) else waveforms
    predicted = [predict_probabilities(model, batch, device).argmax(1).numpy() for batch in batches]
    return report_from_predictions(targets.numpy(), np.concatenate(predicted or [np.zeros(0, np.int64)]), labels)


def report_table(report: EvaluationReport, title: str) -> Table:
    table = Table(title=f"{title}: accuracy {100 * report.accuracy:.2f}% on {report.confusion.sum()} clips",
                  title_justify="left")  # fmt: skip
    for name, justify in (("class", "left"), ("precision", "right"), ("recall", "right"), ("F1", "right"),
                          ("clips", "right")):  # fmt: skip
        table.add_column(name, justify=justify)
    for i, label in enumerate(report.labels):
        table.add_row(label, f"{100 * report.precision[i]:.1f}", f"{100 * report.recall[i]:.1f}",
                      f"{100 * report.f1[i]:.1f}", str(report.support[i]))  # fmt: skip
    return table


def mistakes_table(report: EvaluationReport, root: Path, shown: int = 10) -> Table:
    """The misclassified clips the model was surest of (often a wrong label, or no word at all);
    files under `root` are named relative to it."""
    mistakes = report.mistakes[:shown]
    table = Table(title=f"the {len(mistakes)} surest of {len(report.mistakes)} mistakes (all in --json)",
                  title_justify="left")  # fmt: skip
    columns = (("file", "left"), ("true", "left"), ("predicted", "left"), ("probability", "right"),
               ("loudest", "right"))  # fmt: skip
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")
    for mistake in mistakes:
        clip = mistake.clip
        where = str(clip.path.relative_to(root) if clip.path.is_relative_to(root) else clip.path)
        if clip.level_db is not None:
            where += f" at {clip.start_s:.1f} s, {clip.level_db:.0f} dBFS"
        level = f"{mistake.loudest_db:.0f} dB" if math.isfinite(mistake.loudest_db) else "silent"
        table.add_row(where, mistake.true, mistake.predicted, f"{mistake.probability:.2f}", level)
    return table


def confusion_table(report: EvaluationReport) -> Table:
    table = Table(title="confusion (rows: true class, columns: predicted)", title_justify="left")
    table.add_column("")
    for label in report.labels:
        table.add_column(label, justify="right")
    for i, label in enumerate(report.labels):
        cells = [
            f"[bold]{n}[/]" if i == j else (f"[red]{n}[/]" if n else "[dim]0[/]")
            for j, n in enumerate(report.confusion[i])
        ]
        table.add_row(label, *cells)
    return table


def plot_confusion(report: EvaluationReport, path: str | Path, title: str) -> None:
    """The confusion matrix as a PNG, each row normalised to the class's recall."""
    try:
        import matplotlib
    except ImportError:
        raise KWSError("drawing the confusion matrix needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.confusion / np.maximum(report.confusion.sum(axis=1, keepdims=True), 1)
    size = 1.5 + 0.55 * len(report.labels)
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(100 * rows, cmap="Blues", vmin=0, vmax=100)
    for i in range(len(report.labels)):
        for j in range(len(report.labels)):
            count = report.confusion[i, j]
            if count:
                axis.text(j, i, str(count), ha="center", va="center", fontsize=8,
                          color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
    axis.set_xticks(range(len(report.labels)), report.labels, rotation=45, ha="right")
    axis.set_yticks(range(len(report.labels)), report.labels)
    axis.set(xlabel="predicted class", ylabel="true class",
             title=f"{title}\naccuracy {100 * report.accuracy:.2f}% on {report.confusion.sum()} clips")  # fmt: skip
    figure.colorbar(image, ax=axis, label="share of the true class (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def dataset_config_for(info_recipe: dict, labels: tuple[str, ...], split: str = "testing") -> dict:
    """The `data:` settings to read an evaluation set for a model: its recipe's, with its keywords. For
    split "all" (e.g. recordings of new speakers) the recipe's held-out speakers are not looked for."""
    data = dict(info_recipe.get("data", {}))
    data["path"] = None
    if split == "all":
        data.update(validation_speakers=[], testing_speakers=[])
    # Only the dataset's own recordings: clips borrowed for training may not exist where it is scored.
    data.update(extra_unknown=[], extra_words=[], reversed_unknown=False)
    data["words"] = [label for label in labels if label not in (SILENCE, UNKNOWN)]
    data["unknown"] = UNKNOWN in labels
    if SILENCE not in labels:
        data["silence_fraction"] = 0.0
    return data


def evaluate_dataset(
    model: nn.Module,
    labels: tuple[str, ...],
    clips: list[Clip],
    features: FeatureConfig,
    device: torch.device | str = "cpu",
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> tuple[EvaluationReport, list[str]]:
    """Score `model` on dataset clips whose labels it knows; unreadable files are skipped and returned."""
    index = {label: i for i, label in enumerate(labels)}
    # Words the model was not trained on are what it should call _unknown_ (when it has that class).
    foreign = {clip.label for clip in clips} - set(labels)
    if foreign and UNKNOWN in labels:
        index.update(dict.fromkeys(foreign, index[UNKNOWN]))
    elif foreign:
        raise DataError(f"the model knows none of the labels {', '.join(sorted(foreign))} and has no {UNKNOWN} class")
    skipped, scored, waveforms, targets = [], [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for clip, waveform in load_clips(pool, clips, features):
            if isinstance(waveform, str):
                skipped.append(waveform)
                if on_skip:
                    on_skip(waveform)
            else:
                scored.append(clip)
                waveforms.append(torch.from_numpy(waveform))
                targets.append(index[clip.label])
            if on_progress:
                on_progress(1)
    if not waveforms:
        return report_from_predictions(np.zeros(0, int), np.zeros(0, int), labels), skipped
    probabilities = predict_probabilities(model, torch.stack(waveforms), device).numpy()
    predicted = probabilities.argmax(1)
    tenth = features.sample_rate // 10
    mistakes = [
        Mistake(clip, labels[target], labels[guess], float(row[guess]), float(row[target]),
                loudest_db(waveform.numpy(), tenth))
        for clip, waveform, target, guess, row in zip(scored, waveforms, targets, predicted, probabilities)
        if guess != target
    ]  # fmt: skip
    mistakes.sort(key=lambda mistake: -mistake.probability)
    report = report_from_predictions(np.array(targets), predicted, labels)
    return replace(report, mistakes=tuple(mistakes)), skipped
