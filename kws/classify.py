"""Labelling audio files of any length with a trained model: one result per file, from its best window.

Clips no longer than the model's window are padded as in training and scored in batches; longer
recordings are scanned by the streaming detector's `WindowScorer`, and the window where a keyword is
most certain is reported with its place in the file.
"""

from __future__ import annotations

import os
import re
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from rich.text import Text
from torch import nn

from kws.audio import fit_length, load_audio
from kws.checkpoint import ModelInfo
from kws.data import AUDIO_SUFFIXES
from kws.errors import AudioError, DataError
from kws.models import optimize_for_inference, predict_probabilities
from kws.stream import WindowScorer, is_keyword

# Files are read ahead of the model up to this much on disk: a long recording is held whole once loaded.
READ_AHEAD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FileResult:
    """One file: the top (label, posterior) pairs of its chosen window, or the reason it could not be read.

    `start_s` and `end_s` place the window in the file (clipped to its duration); a clip no longer
    than the model's window is one window, the whole file.
    """

    path: Path
    duration_s: float = 0.0
    top: tuple[tuple[str, float], ...] = ()
    start_s: float = 0.0
    end_s: float = 0.0
    windows: int = 0  # windows scored: 1 for a clip, more for a scanned recording
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    @property
    def score(self) -> float | None:
        return self.top[0][1] if self.top else None

    def to_dict(self) -> dict:
        """For JSON lines: every key on every row, null where a bad file has no value."""
        classified = self.error is None
        return {
            "path": str(self.path),
            "duration_s": round(self.duration_s, 4) if classified else None,
            "label": self.label,
            "score": _round(self.score),
            "top": [{"label": label, "score": _round(score)} for label, score in self.top],
            "start_s": round(self.start_s, 4) if classified else None,
            "end_s": round(self.end_s, 4) if classified else None,
            "windows": self.windows if classified else None,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, row: dict) -> FileResult:
        """Read back a row of `to_dict` (JSON lines, Parquet) or of `to_csv_row` (CSV: strings, runners-up in
        `label_2`, `score_2`, ... columns)."""
        if "top" in row:
            top = [(item["label"], item["score"]) for item in row["top"]]
        else:
            top = [(row["label"], row["score"])] if row.get("label") else []
            rank = 2
            while row.get(f"label_{rank}"):
                top.append((row[f"label_{rank}"], row[f"score_{rank}"]))
                rank += 1
        if row.get("error"):
            return cls(Path(row["path"]), error=row["error"])
        return cls(
            Path(row["path"]), float(row["duration_s"]), tuple((label, float(score)) for label, score in top),
            float(row["start_s"]), float(row["end_s"]), int(row["windows"]),
        )  # fmt: skip

    def to_csv_row(self, top_k: int) -> dict:
        """For `csv.DictWriter(fieldnames=csv_fields(top_k))`: empty cells where there is no value."""
        values = self.to_dict()
        row = {key: "" if values[key] is None else values[key] for key in csv_fields(1)}
        for rank, (label, score) in enumerate(self.top[1:top_k], start=2):
            row[f"label_{rank}"], row[f"score_{rank}"] = label, _round(score)
        return row


def _round(score: float | None) -> float | None:
    return None if score is None else round(score, 6)


def csv_fields(top_k: int) -> list[str]:
    ranked = [f"{name}_{rank}" for rank in range(2, top_k + 1) for name in ("label", "score")]
    return ["path", "duration_s", "label", "score", *ranked, "start_s", "end_s", "windows", "error"]


def natural_key(path: Path) -> tuple:
    """Sort key that puts `clip2.wav` before `clip10.wav`: runs of digits compare as numbers."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path)))


def find_audio_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to classify, in input order; a folder stands for its audio files, searched recursively.

    A folder's files (suffixes in `AUDIO_SUFFIXES`) are sorted naturally. Other paths are kept as they
    are, existing or not, so that a missing file is reported with the unreadable ones. Raises
    `DataError` when there is nothing at all to classify.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            audio = (item for item in path.rglob("*") if item.is_file() and item.suffix.lower() in AUDIO_SUFFIXES)
            found.extend(sorted(audio, key=natural_key))
        else:
            found.append(path)
    if not found:
        where = ", ".join(str(path) for path in paths) or "no paths given"
        raise DataError(f"no audio files ({' '.join(AUDIO_SUFFIXES)}) found in {where}")
    return found


def classify_files(
    model: nn.Module,
    info: ModelInfo,
    paths: Sequence[Path],
    top_k: int = 3,
    hop_ms: float = 100.0,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[FileResult]:
    """Classify each file with `model` (on `device`), yielding results in input order as they are ready.

    Files are loaded in parallel (`workers` threads, default one per CPU core) at the model's sample
    rate; on the CPU the model runs as its traced, frozen copy (`optimize_for_inference`). A file no
    longer than the model's window is padded like a training clip and scored in batches of
    `batch_size`. A longer one is scanned every `hop_ms`; its chosen window is the one where a keyword
    is the top label with the highest posterior, or, when no window's top label is a keyword, the one
    with the highest top posterior. A file that cannot be read gives a result with `error` set.
    """
    features = info.features
    model = optimize_for_inference(model.eval(), features.clip_samples)  # once, not per long file
    ready: dict[int, FileResult] = {}  # results waiting for an earlier file's
    waiting: list[tuple[int, Path, np.ndarray]] = []  # short clips waiting for a full batch
    next_index = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        loaded = _load_in_order(pool, paths, features.sample_rate, read_ahead_files=2 * batch_size)
        for index, (path, waveform) in enumerate(loaded):
            if isinstance(waveform, str):
                ready[index] = FileResult(path, error=waveform)
            elif len(waveform) > features.clip_samples:
                ready[index] = _scan(model, info, path, waveform, top_k, hop_ms, batch_size, device)
            else:
                waiting.append((index, path, waveform))
                if len(waiting) == batch_size:
                    ready.update(_score_clips(model, info, waiting, top_k, device))
                    waiting = []
            while next_index in ready:
                yield ready.pop(next_index)
                next_index += 1
        ready.update(_score_clips(model, info, waiting, top_k, device))
        while next_index in ready:
            yield ready.pop(next_index)
            next_index += 1


def _load_in_order(
    pool: ThreadPoolExecutor, paths: Sequence[Path], sample_rate: int, read_ahead_files: int
) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(path, waveform or error line) in order; later files load while the caller scores earlier ones."""

    def load(path: Path) -> np.ndarray | str:
        try:
            return load_audio(path, sample_rate)
        except AudioError as error:
            return str(error)

    in_flight: deque[tuple[Path, int, Future]] = deque()
    bytes_ahead = 0
    for path in paths:
        size = _size_on_disk(path)
        while in_flight and (len(in_flight) >= read_ahead_files or bytes_ahead + size > READ_AHEAD_BYTES):
            done_path, done_size, future = in_flight.popleft()
            bytes_ahead -= done_size
            yield done_path, future.result()
        in_flight.append((path, size, pool.submit(load, path)))
        bytes_ahead += size
    for done_path, _, future in in_flight:
        yield done_path, future.result()


def _size_on_disk(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _score_clips(
    model: nn.Module, info: ModelInfo, clips: list[tuple[int, Path, np.ndarray]], top_k: int,
    device: str | torch.device,
) -> dict[int, FileResult]:  # fmt: skip
    if not clips:
        return {}
    sample_rate, clip_samples = info.features.sample_rate, info.features.clip_samples
    batch = torch.from_numpy(np.stack([fit_length(waveform, clip_samples) for _, _, waveform in clips]))
    posteriors = predict_probabilities(model, batch, device, batch_size=len(batch))
    results = {}
    for (index, path, waveform), row in zip(clips, posteriors):
        duration_s = len(waveform) / sample_rate
        results[index] = FileResult(path, duration_s, _top(row, info.labels, top_k), 0.0, duration_s, windows=1)
    return results


def _scan(
    model: nn.Module, info: ModelInfo, path: Path, waveform: np.ndarray, top_k: int, hop_ms: float,
    batch_size: int, device: str | torch.device,
) -> FileResult:  # fmt: skip
    scorer = WindowScorer(model, info.features, hop_ms, device, batch_size, optimize=False)
    parts = [scorer.push(waveform), scorer.flush()]
    ends_s = np.concatenate([part_ends for part_ends, _ in parts])
    posteriors = torch.cat([part for _, part in parts if len(part)])
    best = choose_window(posteriors, info.labels)
    duration_s = len(waveform) / info.features.sample_rate
    start_s = max(0.0, float(ends_s[best]) - info.features.clip_s)
    end_s = min(duration_s, float(ends_s[best]))
    return FileResult(path, duration_s, _top(posteriors[best], info.labels, top_k), start_s, end_s, len(ends_s))


def choose_window(posteriors: torch.Tensor, labels: Sequence[str]) -> int:
    """Which window to report, given its posteriors (windows, classes).

    Of the windows whose top label is a keyword, the one where it is most certain; when there are
    none, the window with the highest top posterior.
    """
    top_scores, top_labels = posteriors.max(dim=1)
    keyword_on_top = torch.tensor([is_keyword(labels[index]) for index in top_labels.tolist()], dtype=torch.bool)
    if keyword_on_top.any():
        top_scores = torch.where(keyword_on_top, top_scores, torch.full_like(top_scores, -1.0))
    return int(top_scores.argmax())


def _top(row: torch.Tensor, labels: Sequence[str], top_k: int) -> tuple[tuple[str, float], ...]:
    scores, indices = row.topk(min(top_k, len(labels)))
    return tuple((labels[index], float(score)) for score, index in zip(scores.tolist(), indices.tolist()))


def summary_line(results: Sequence[FileResult], seconds: float) -> str:
    """`classified N of M files in S s (F files/s); top labels: yes 10, no 2`."""
    labels = Counter(result.label for result in results if result.error is None)
    classified = sum(labels.values())
    rate = len(results) / seconds if seconds > 0 else float("inf")
    line = f"classified {classified} of {len(results)} files in {seconds:.1f} s ({rate:.0f} files/s)"
    if labels:
        line += "; top labels: " + ", ".join(f"{label} {count}" for label, count in labels.most_common())
    return line


def results_table(results: Sequence[FileResult], top_k: int) -> Table:
    """One row per file: its label and score, the runners-up as "label score", and where a scanned file's window is.

    Paths are shown relative to the folder all the files share, which is the table's title.
    """
    common = Path(os.path.commonpath([str(result.path.parent) for result in results])) if results else Path()
    table = Table(title=f"in {common}/" if str(common) not in ("", ".") else None, title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("label")
    table.add_column("score", justify="right")
    for rank in range(2, top_k + 1):
        table.add_column({2: "2nd", 3: "3rd"}.get(rank, f"{rank}th"))
    table.add_column("window", justify="right")
    for result in results:
        if result.error is not None:
            table.add_row(Text(_relative(result.path, common)), Text("skipped", style="red"))
            continue
        runners_up = [Text(f"{label} {score:.3f}") for label, score in result.top[1:top_k]]
        window = f"{result.start_s:.2f}-{result.end_s:.2f} s" if result.windows > 1 else ""
        label = Text(result.label or "", style="bold" if is_keyword(result.label or "") else "dim")
        table.add_row(Text(_relative(result.path, common)), label, f"{result.score:.3f}", *runners_up, window)
    return table


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)
