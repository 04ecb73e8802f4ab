"""Datasets as lists of labelled clips with speaker-disjoint splits: Speech Commands, FSDD and manifests."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.table import Table

from kws.audio import AudioInfo, fit_length, load_audio, read_info, resample
from kws.config import DataConfig, expand_path
from kws.errors import AudioError, DataError

SILENCE = "_silence_"
UNKNOWN = "_unknown_"
SPLITS = ("training", "validation", "testing")
NOISE_FOLDER = "_background_noise_"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
DEFAULT_SPEECH_COMMANDS_WORDS = ("yes", "no", "up", "down", "left", "right", "stop")

# Fractions of each background-noise recording that silence clips of each split are cut from, so
# no stretch of noise is heard in two splits.
NOISE_SPLIT_SPANS = {"training": (0.0, 0.8), "validation": (0.8, 0.9), "testing": (0.9, 1.0), "all": (0.0, 1.0)}
# This share of silence clips is near-digital silence, far below any room's noise floor.
NEAR_DIGITAL_SILENCE_SHARE = 0.1
NEAR_DIGITAL_SILENCE_DB = -110.0

_SPLIT_NAMES = {
    "training": "training", "train": "training",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "testing": "testing", "test": "testing",
}  # fmt: skip
_FSDD_NAME = re.compile(r"^(?P<label>[^_]+)_(?P<speaker>.+)_(?P<index>\d+)$")
# TensorFlow's speech_commands which_set() hashes names into this many buckets.
_MAX_CLIPS_PER_CLASS = 2**27 - 1


@dataclass(frozen=True)
class Clip:
    """One labelled example. Silence clips are cut from a noise recording: `start_s` and `level_db` say how."""

    path: Path
    label: str
    split: str
    speaker: str
    start_s: float = 0.0
    level_db: float | None = None  # silence only: RMS level the crop is scaled to, dBFS
    reversed: bool = False  # played backwards (a made-up negative)
    recorded_rate: int | None = None  # heard as if recorded at this rate (ExtraWords.sample_rate)

    def to_dict(self) -> dict:
        values = {"path": str(self.path), "label": self.label, "split": self.split, "speaker": self.speaker}
        if self.level_db is not None:
            values.update(start_s=self.start_s, level_db=self.level_db)
        if self.reversed:
            values["reversed"] = True
        if self.recorded_rate is not None:
            values["recorded_rate"] = self.recorded_rate
        return values


@dataclass(frozen=True)
class Dataset:
    """Labelled clips of one source. `labels` fixes the class order models use."""

    root: Path
    layout: str
    labels: tuple[str, ...]
    clips: tuple[Clip, ...]
    noise_files: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()  # what a person should know before trusting scores on it

    def split(self, name: str) -> list[Clip]:
        """The clips of split `name`, or every clip for "all"."""
        return [clip for clip in self.clips if name in (clip.split, "all")]


def which_set(filename: str, validation_percent: float, testing_percent: float) -> str:
    """TensorFlow's speech_commands rule: the split from the SHA-1 of the name before `_nohash_`.

    Every clip of a speaker lands in the same split whatever the file order.
    """
    base = re.sub(r"_nohash_.*$", "", os.path.basename(filename))
    digest = int(hashlib.sha1(base.encode()).hexdigest(), 16)
    percent = (digest % (_MAX_CLIPS_PER_CLASS + 1)) * (100.0 / _MAX_CLIPS_PER_CLASS)
    if percent < validation_percent:
        return "validation"
    if percent < validation_percent + testing_percent:
        return "testing"
    return "training"


def load_dataset(config: DataConfig, path: str | os.PathLike | None = None) -> Dataset:
    """List a dataset's clips, labels and splits (no audio is read but noise headers)."""
    source = path if path is not None else config.path
    if source is None:
        raise DataError("no dataset given: pass a folder or manifest, or set data.path in the recipe")
    source = expand_path(source)
    if not source.exists():
        raise DataError(f"{source}: dataset not found")
    layout = config.layout if config.layout != "auto" else detect_layout(source)
    if layout != "manifest" and not source.is_dir():
        raise DataError(f"{source}: the {layout} layout reads a folder (a CSV/JSONL manifest: data.layout=manifest)")
    if layout == "speech_commands":
        dataset = _speech_commands(source, config)
    elif layout == "fsdd":
        dataset = _fsdd(source, config)
    elif layout == "folder":
        dataset = _folder(source, config)
    else:
        dataset = _manifest(source, config)
    if not dataset.clips:
        raise DataError(f"{source}: no clips found for labels {', '.join(dataset.labels)}")
    return dataset


def detect_layout(source: Path) -> str:
    if source.is_file():
        return "manifest"
    recordings = source / "recordings" if (source / "recordings").is_dir() else source
    names = [p.stem for p in recordings.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES]
    # A Speech Commands word folder (`<speaker>_nohash_<n>`) also fits the FSDD pattern; it is a folder.
    if names and all(_FSDD_NAME.match(name) and "_nohash_" not in name for name in names):
        return "fsdd"
    if any(p.is_dir() and not p.name.startswith((".", "_")) for p in source.iterdir()):
        return "speech_commands"
    if any(p.suffix.lower() in AUDIO_SUFFIXES for p in source.iterdir()):
        return "folder"
    raise DataError(
        f"{source}: not a dataset kws knows (a folder per word, a folder of recordings, FSDD, or a CSV/JSONL manifest)"
    )


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _audio_files_below(folder: Path) -> list[Path]:
    """Every audio file in `folder` and its subfolders, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _speaker_of(path: Path) -> str:
    """Speech Commands names clips `<speaker>_nohash_<n>`; other names count as their own speaker."""
    return re.sub(r"_nohash_.*$", "", path.stem)


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def _labels_for(config: DataConfig, words: tuple[str, ...], has_unknown: bool) -> tuple[str, ...]:
    extra = (SILENCE,) if config.silence_fraction > 0 else ()
    if has_unknown:  # _unknown_ clips exist only when data.unknown or extra negatives put them there
        extra += (UNKNOWN,)
    return extra + words


def _speech_commands(root: Path, config: DataConfig) -> Dataset:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    words = config.words or tuple(w for w in DEFAULT_SPEECH_COMMANDS_WORDS if w in folders) or tuple(folders)
    missing = [word for word in words if word not in folders]
    if missing:
        raise DataError(f"{root}: no folder for word(s) {', '.join(missing)} (found {', '.join(folders)})")
    validation, testing = _read_list(root / "validation_list.txt"), _read_list(root / "testing_list.txt")
    use_lists = bool(validation or testing)
    others = [name for name in folders if name not in words] if config.unknown else []
    clips = []
    for folder in [*words, *others]:
        label = folder if folder in words else UNKNOWN
        for path in _audio_files(root / folder):
            relative = f"{folder}/{path.name}"
            speaker = _speaker_of(path)
            if use_lists:
                split = "validation" if relative in validation else "testing" if relative in testing else "training"
            elif config.validation_speakers or config.testing_speakers:
                split = _split_by_speaker(speaker, config)
            else:
                split = which_set(path.name, config.validation_percent, config.testing_percent)
            clips.append(Clip(path, label, split, speaker))
    noise_dir = Path(config.noise_dir) if config.noise_dir else root / NOISE_FOLDER
    return _with_silence(root, "speech_commands", words, clips, noise_dir, config)


def _folder(root: Path, config: DataConfig) -> Dataset:
    """A folder of recordings of one word, e.g. `speech_commands/yes`: the folder name is the label."""
    clips = [
        Clip(path, root.name, which_set(path.name, config.validation_percent, config.testing_percent),
             _speaker_of(path))
        for path in _audio_files(root)
    ]  # fmt: skip
    return Dataset(root, "folder", (root.name,), tuple(clips))


def _split_by_speaker(speaker: str, config: DataConfig) -> str:
    if speaker in config.testing_speakers:
        return "testing"
    if speaker in config.validation_speakers:
        return "validation"
    return "training"


def _fsdd(root: Path, config: DataConfig) -> Dataset:
    recordings = root / "recordings" if (root / "recordings").is_dir() else root
    entries = []
    for path in _audio_files(recordings):
        match = _FSDD_NAME.match(path.stem)
        if match is None:
            raise DataError(f"{path}: not an FSDD name (expected <digit>_<speaker>_<n>.wav)")
        entries.append((path, match["label"], match["speaker"]))
    speakers = sorted({speaker for _, _, speaker in entries})
    held_out = {*config.validation_speakers, *config.testing_speakers}
    unknown_speakers = sorted(held_out - set(speakers))
    if unknown_speakers:
        raise DataError(f"{root}: no speaker(s) {', '.join(unknown_speakers)} (found {', '.join(speakers)}); "
                        "to score recordings of other speakers, take them all: --split all")  # fmt: skip
    if not held_out and len(speakers) >= 3:
        # With no speakers named, hold out the last speaker (sorted) for testing and the one before for
        # validation, so the splits are speaker-disjoint and stable.
        config = replace(config, validation_speakers=(speakers[-2],), testing_speakers=(speakers[-1],))
    all_labels = tuple(sorted({label for _, label, _ in entries}, key=_natural_key))
    words = config.words or all_labels
    clips = [
        Clip(path, label if label in words else UNKNOWN, _split_by_speaker(speaker, config), speaker)
        for path, label, speaker in entries
        if label in words or config.unknown
    ]
    noise_dir = Path(config.noise_dir) if config.noise_dir else None
    return _with_silence(root, "fsdd", words, clips, noise_dir, config)


def _manifest(path: Path, config: DataConfig) -> Dataset:
    rows = _read_manifest(path)
    all_labels = tuple(sorted({row["label"] for _, row in rows}, key=_natural_key))
    words = config.words or tuple(label for label in all_labels if label not in (SILENCE, UNKNOWN))
    clips = []
    for number, row in rows:
        clip_path = expand_path(row["path"])
        if not clip_path.is_absolute():
            clip_path = path.parent / clip_path
        speaker = row.get("speaker") or _speaker_of(clip_path)
        split = row.get("split")
        if split:
            if split.lower() not in _SPLIT_NAMES:
                raise DataError(f"{path}:{number}: unknown split {split!r} (use training, validation or testing)")
            split = _SPLIT_NAMES[split.lower()]
        elif config.validation_speakers or config.testing_speakers:
            split = _split_by_speaker(speaker, config)
        else:
            split = which_set(f"{speaker}_nohash_", config.validation_percent, config.testing_percent)
        label = row["label"]
        if label not in words:
            if not config.unknown:
                continue
            label = UNKNOWN
        clips.append(Clip(clip_path, label, split, speaker))
    noise_dir = Path(config.noise_dir) if config.noise_dir else None
    return _with_silence(path, "manifest", words, clips, noise_dir, config)


def _read_manifest(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every row, numbered as in the file, for error messages."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{path}: a manifest is a .csv or .jsonl file with path and label columns")
    text = path.read_text()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [(reader.line_num, row) for row in reader]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    for number, row in rows:
        if not isinstance(row, dict) or not row.get("path") or not row.get("label"):
            raise DataError(f"{path}:{number}: every row needs a path and a label")
    return [(number, {key: str(value) for key, value in row.items() if value is not None}) for number, row in rows]


def _with_silence(
    root: Path, layout: str, words: tuple[str, ...], clips: list[Clip], noise_dir: Path | None, config: DataConfig
) -> Dataset:
    noise_files = tuple(_audio_files(noise_dir)) if noise_dir is not None and noise_dir.is_dir() else ()
    if noise_dir is not None and config.noise_dir and not noise_files:
        raise DataError(f"{noise_dir}: no background noise recordings found (data.noise_dir)")
    extra = _extra_negatives(clips, words, config) + _extra_words(words, config)
    check_not_held_out(clips, [clip.path for clip in extra if not clip.reversed], "data.extra_unknown / extra_words")
    has_unknown = bool(config.negative_speech) or any(clip.label == UNKNOWN for clip in clips + extra)
    if noise_files and config.silence_fraction > 0:
        clips = clips + _silence_clips(clips, noise_files, config)
        labels = _labels_for(config, words, has_unknown)
    else:
        labels = _labels_for(replace(config, silence_fraction=0.0), words, has_unknown)
    return Dataset(root, layout, labels, tuple(clips + extra), noise_files, _split_warnings(clips))


def check_not_held_out(clips: list[Clip], borrowed: list[Path], setting: str) -> None:
    """Recordings borrowed for training must not be the dataset's validation or testing recordings
    (e.g. a folder of other speech that holds the dataset): the model would be scored on what it learnt."""
    if not borrowed:
        return
    held_out = {clip.path.resolve(): clip for clip in clips if clip.split != "training" and clip.level_db is None}
    leaked = [path for path in borrowed if path.resolve() in held_out]
    if leaked:
        first = held_out[leaked[0].resolve()]
        raise DataError(
            f"{setting}: {len(leaked)} borrowed file(s) are the dataset's validation or testing recordings, e.g. "
            f"{leaked[0]} ({first.split}); point it at recordings outside the dataset's held-out splits"
        )


def _split_warnings(clips: list[Clip]) -> tuple[str, ...]:
    """A warning when one speaker's recordings lie in two splits (given split lists or a manifest's split
    column can do that): scores on that split then flatter the model, which has heard the voice."""
    splits_of = defaultdict(set)
    for clip in clips:
        if clip.level_db is None:
            splits_of[clip.speaker].add(clip.split)
    shared = sorted(speaker for speaker, splits in splits_of.items() if len(splits) > 1)
    if not shared:
        return ()
    named = ", ".join(f"{speaker} ({'/'.join(sorted(splits_of[speaker]))})" for speaker in shared[:5])
    more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
    return (f"{len(shared)} speaker(s) in two splits: {named}{more}; validation and test scores are not on "
            "unheard speakers (fix the split lists or the manifest's split column)",)  # fmt: skip


def _extra_negatives(clips: list[Clip], words: tuple[str, ...], config: DataConfig) -> list[Clip]:
    """More _unknown_ clips, for training only: validation and test sets stay the dataset's own
    recordings, comparable with other work and with the scores `kws evaluate` gives."""
    extra = []
    if config.reversed_unknown:
        extra += [
            replace(clip, label=UNKNOWN, reversed=True)
            for clip in clips
            if clip.label in words and clip.split == "training"
        ]
    for folder in config.extra_unknown:
        root = expand_path(folder)
        if not root.is_dir():
            raise DataError(f"{root}: extra_unknown folder not found")
        for path in _audio_files_below(root):
            if NOISE_FOLDER in path.parts:
                continue
            extra.append(Clip(path, UNKNOWN, "training", _speaker_of(path)))
    return extra


def negative_speech_files(config: DataConfig, dataset: Dataset | None = None) -> list[Path]:
    """The recordings `data.negative_speech` names: every audio file under a folder, or a manifest's
    training rows (its validation and testing rows stay out of training); none may be one of `dataset`'s
    validation or testing recordings."""
    files = []
    for source in config.negative_speech:
        path = expand_path(source)
        if path.is_dir():
            files += _audio_files_below(path)
        elif path.is_file():
            listed = _manifest(path, DataConfig(layout="manifest", silence_fraction=0.0))
            files += [clip.path for clip in listed.clips if clip.split == "training"]
        else:
            raise DataError(f"{path}: data.negative_speech: no such folder or manifest")
    if config.negative_speech and not files:
        raise DataError(f"data.negative_speech: no training recordings in {', '.join(config.negative_speech)}")
    if dataset is not None:
        check_not_held_out(list(dataset.clips), files, "data.negative_speech")
    return files


def _extra_words(words: tuple[str, ...], config: DataConfig) -> list[Clip]:
    """Training clips of the recipe's words from other datasets; validation and test stay the dataset's own."""
    extra = []
    for source in config.extra_words:
        root = expand_path(source.path)
        if not root.is_dir():
            raise DataError(f"{root}: extra_words folder not found")
        for folder, label in source.label_of().items():
            if label not in (*words, UNKNOWN):
                raise DataError(f"{root / folder}: extra_words label {label!r} is not a word of this dataset "
                                f"({', '.join(words)}) nor {UNKNOWN}")  # fmt: skip
            if not (root / folder).is_dir():
                raise DataError(f"{root / folder}: extra_words folder not found")
            extra += [
                Clip(path, label, "training", _speaker_of(path), recorded_rate=source.sample_rate)
                for path in _audio_files(root / folder)
            ]
    return extra


def _silence_clips(clips: list[Clip], noise_files: tuple[Path, ...], config: DataConfig) -> list[Clip]:
    """Crops of background noise at levels from near-digital silence to a loud room, per split."""
    infos = [read_info(path) for path in noise_files]
    counts = Counter(clip.split for clip in clips)
    rng = random.Random(config.seed)
    low_db, high_db = config.silence_db_range
    silence = []
    for split in SPLITS:
        first, last = NOISE_SPLIT_SPANS[split]
        for index in range(round(counts[split] * config.silence_fraction)):
            info = infos[index % len(infos)]
            # The 1 s crop starts and ends inside this split's span, so splits share no noise.
            span_s = (last - first) * info.duration_s
            start_s = first * info.duration_s + rng.uniform(0.0, 1.0) * max(span_s - 1.0, 0.0)
            near_digital = rng.random() < NEAR_DIGITAL_SILENCE_SHARE
            level_db = NEAR_DIGITAL_SILENCE_DB if near_digital else rng.uniform(low_db, high_db)
            silence.append(Clip(info.path, SILENCE, split, "noise", round(start_s, 4), round(level_db, 2)))
    return silence


def load_clip(clip: Clip, sample_rate: int, num_samples: int) -> np.ndarray:
    """A clip's waveform: mono float32 at `sample_rate`, exactly `num_samples` long."""
    if clip.recorded_rate is not None:
        narrow = load_audio(clip.path, clip.recorded_rate)
        return fit_length(resample(narrow, clip.recorded_rate, sample_rate), num_samples)
    if clip.level_db is None:
        waveform = load_audio(clip.path, sample_rate, num_samples)
        return np.ascontiguousarray(waveform[::-1]) if clip.reversed else waveform
    crop = load_audio(clip.path, sample_rate, offset_s=clip.start_s, duration_s=num_samples / sample_rate)
    crop = np.pad(crop, (0, max(num_samples - len(crop), 0)))[:num_samples]
    rms = float(np.sqrt(np.mean(crop.astype(np.float64) ** 2)))
    if rms > 0:
        crop = crop * np.float32(10 ** (clip.level_db / 20) / rms)
    return crop


def _natural_key(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


@dataclass(frozen=True)
class DatasetSummary:
    """Counts for people: clips per class and split, speakers, durations and sample rates."""

    counts: dict[str, dict[str, int]]  # label -> split -> clips
    speakers: dict[str, int]  # split -> distinct speakers
    duration_s: dict[str, float]  # split -> total seconds
    sample_rates: dict[int, int]  # Hz -> files
    unreadable: list[str]  # one line per file whose header could not be read


def summarize(dataset: Dataset, workers: int | None = None) -> DatasetSummary:
    """Read every file's header (in parallel) and count clips, speakers, seconds and sample rates."""
    counts: dict[str, dict[str, int]] = {label: dict.fromkeys(SPLITS, 0) for label in dataset.labels}
    speakers: dict[str, set] = defaultdict(set)
    for clip in dataset.clips:
        counts[clip.label][clip.split] += 1
        if clip.level_db is None:
            speakers[clip.split].add(clip.speaker)
    spoken = [clip for clip in dataset.clips if clip.level_db is None]

    def header(clip: Clip) -> AudioInfo | str:
        try:
            return read_info(clip.path)
        except AudioError as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        headers = list(pool.map(header, spoken, chunksize=64))
    duration_s = dict.fromkeys(SPLITS, 0.0)
    sample_rates: Counter = Counter()
    unreadable = []
    for clip, info in zip(spoken, headers):
        if isinstance(info, str):
            unreadable.append(info)
            continue
        duration_s[clip.split] += info.duration_s
        sample_rates[info.sample_rate] += 1
    for clip in dataset.clips:
        if clip.level_db is not None:
            duration_s[clip.split] += 1.0
    return DatasetSummary(
        counts, {split: len(speakers[split]) for split in SPLITS}, duration_s, dict(sample_rates), unreadable
    )


def summary_table(dataset: Dataset, summary: DatasetSummary, title: str | None = None) -> Table:
    """A rich table: one row per class, a column per split, then totals, speakers and durations."""
    table = Table(title=title or f"{dataset.root} ({dataset.layout})", title_justify="left")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("all", justify="right")
    for label in dataset.labels:
        row = summary.counts[label]
        table.add_row(label, *(str(row[split]) for split in SPLITS), str(sum(row.values())))
    totals = [sum(summary.counts[label][split] for label in dataset.labels) for split in SPLITS]
    table.add_section()
    table.add_row("clips", *map(str, totals), str(sum(totals)), style="bold")
    speakers = [summary.speakers[split] for split in SPLITS]
    table.add_row("speakers", *map(str, speakers), str(sum(speakers)))
    minutes = [summary.duration_s[split] / 60 for split in SPLITS]
    table.add_row("minutes", *(f"{m:.1f}" for m in minutes), f"{sum(minutes):.1f}")
    rates = ", ".join(f"{rate} Hz x {n}" for rate, n in sorted(summary.sample_rates.items()))
    table.caption = f"sample rates: {rates or 'none read'}"
    return table
