"""Feature caches: a dataset's clips as training hears them, per split, on disk, keyed by the FeatureConfig.

A cache folder holds `cache.json` (settings, their fingerprint, labels, counts, skipped files) and,
per split, `<split>.waveforms` (float16 rows of `clip_samples`, one clip after another, read a batch
at a time by `WaveformStore`), `<split>.labels.npy` (label indices, int64) and `<split>.jsonl` (one
line per clip, in the same order). Every file is written as the clips are read, so no split is ever
in memory whole; the folder is written under a temporary name and moved into place whole, so an
interrupted run leaves nothing half-written. Features are not stored: every model computes its own
from the waveform.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from kws import __version__
from kws.audio import loudest_db
from kws.config import DataConfig, FeatureConfig
from kws.data import SPLITS, Clip, Dataset, load_clip
from kws.errors import AudioError, CacheError

CACHE_FORMAT = 2  # 1: one safetensors file per split, read whole
BATCH_CLIPS = 256


@dataclass
class ExtractResult:
    """What an extraction did: clips stored per split, and one line per file that was skipped."""

    out_dir: Path
    stored: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    up_to_date: bool = False
    seconds: float = 0.0


class WaveformStore:
    """A split's waveforms on disk: float16 rows of `samples`, one clip after another in one file.

    `read` returns just the rows asked for, so a split far larger than memory trains a batch at a time.
    """

    dtype = np.dtype("<f2")

    def __init__(self, path: str | os.PathLike, samples: int) -> None:
        self.path = Path(path)
        self.samples = samples
        self.row_bytes = samples * self.dtype.itemsize
        size = self.path.stat().st_size
        if size % self.row_bytes:
            raise CacheError(f"{self.path}: {size} bytes is no whole number of {samples}-sample clips; extract again")
        self.clips = size // self.row_bytes

    def __len__(self) -> int:
        return self.clips

    def read(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The rows at `indices`, in that order (repeats allowed): (len(indices), samples) float32."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.clips):
            raise IndexError(f"{self.path}: rows {indices.min()}..{indices.max()} asked of {self.clips}")
        rows, order = np.unique(indices, return_inverse=True)
        # Plain reads into a fresh buffer, not a memory map: mapped pages count in this process's
        # resident memory as long as they stay mapped, read pages only in the kernel's page cache,
        # which it drops under pressure. So resident memory stays one batch, whatever the store's size.
        buffer = np.empty((len(rows), self.samples), self.dtype)
        run_starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # consecutive rows: one read
        with open(self.path, "rb", buffering=0) as handle:
            for first, end in zip(run_starts, [*run_starts[1:], len(rows)]):
                offset = int(rows[first]) * self.row_bytes
                _read_exactly(handle.fileno(), memoryview(buffer[first:end]).cast("B"), offset)
        return torch.from_numpy(buffer[order.reshape(-1)]).float()

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """Every row in order, `size` at a time (float32)."""
        for start in range(0, self.clips, size):
            yield self.read(np.arange(start, min(start + size, self.clips)))


def _read_exactly(descriptor: int, into: memoryview, offset: int) -> None:
    while len(into):
        count = os.preadv(descriptor, [into], offset)
        if count == 0:
            raise CacheError(f"a waveform store ended early, at byte {offset}; extract again")
        into, offset = into[count:], offset + count


def append_waveforms(handle, waveforms: np.ndarray | torch.Tensor) -> None:
    """Add (clips, samples) rows to the end of a store's file, open for binary writing."""
    handle.write(np.ascontiguousarray(np.asarray(waveforms), dtype=WaveformStore.dtype).tobytes())


@dataclass(frozen=True)
class CachedSplit:
    """One split read back from a cache: its waveforms, and its clip list until asked for, stay on disk."""

    waveforms: WaveformStore
    labels: torch.Tensor  # (clips,) int64 indices into the cache's labels
    clips_path: Path  # <split>.jsonl

    def clips(self) -> list[dict]:
        """Each clip's description (`Clip.to_dict`), in the order of the rows."""
        with open(self.clips_path) as lines:
            return [json.loads(line) for line in lines]


def dataset_fingerprint(dataset: Dataset, features: FeatureConfig) -> str:
    """Changes when the settings, the clip list, or any file's size or modification time changes."""
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT} {features.fingerprint()} {dataset.labels}".encode())
    stats: dict[Path, str] = {}
    for clip in dataset.clips:
        if clip.path not in stats:
            try:
                stat = clip.path.stat()
                stats[clip.path] = f"{stat.st_size} {stat.st_mtime_ns}"
            except OSError:
                stats[clip.path] = "missing"
        digest.update(f"{json.dumps(clip.to_dict(), sort_keys=True)} {stats[clip.path]}\n".encode())
    return digest.hexdigest()[:16]


def default_cache_dir(dataset: Dataset, features: FeatureConfig, root: str | os.PathLike = "features") -> Path:
    """`root/<dataset name>-<fingerprint>`: where `kws extract` writes and `kws train` looks by default."""
    return Path(root) / f"{dataset.root.stem}-{dataset_fingerprint(dataset, features)}"


def extract_features(
    dataset: Dataset,
    data_config: DataConfig,
    features: FeatureConfig,
    out_dir: str | os.PathLike,
    workers: int | None = None,
    force: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Store every clip of `dataset` as training hears it, split by split, a batch at a time.

    Files that cannot be read are skipped (reported through `on_skip` and in the result) and the
    rest go on. An existing cache with the same fingerprint is left as it is unless `force`.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    fingerprint = dataset_fingerprint(dataset, features)
    existing = out_dir / "cache.json"
    if not force and existing.is_file():
        try:
            manifest = json.loads(existing.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("format") == CACHE_FORMAT and manifest.get("dataset_fingerprint") == fingerprint:
            stored = {split: info["clips"] for split, info in manifest["splits"].items()}
            return ExtractResult(out_dir, stored, manifest.get("skipped", []), up_to_date=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    result = ExtractResult(out_dir)
    label_index = {label: index for index, label in enumerate(dataset.labels)}

    def skip(line: str) -> None:
        result.skipped.append(line)
        if on_skip:
            on_skip(line)

    try:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            for split in SPLITS:
                loaded = load_clips(pool, dataset.split(split), features)
                result.stored[split] = _write_split(staging, split, loaded, label_index, skip, on_progress)
        manifest = {
            "format": CACHE_FORMAT,
            "kws_version": __version__,
            "features": features.to_dict(),
            "feature_fingerprint": features.fingerprint(),
            "clip_samples": features.clip_samples,
            "dataset_fingerprint": fingerprint,
            "source": str(dataset.root),
            "layout": dataset.layout,
            "data": _jsonable(data_config),
            "labels": list(dataset.labels),
            "splits": {split: {"clips": count} for split, count in result.stored.items()},
            "skipped": result.skipped,
        }
        (staging / "cache.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - started
    return result


def load_clips(pool: ThreadPoolExecutor, clips: list[Clip], features: FeatureConfig) -> Iterator:
    """(clip, waveform or error line) in clip order, loaded in parallel a window at a time."""

    def load(clip: Clip) -> np.ndarray | str:
        try:
            return load_clip(clip, features.sample_rate, features.clip_samples)
        except AudioError as error:
            return str(error)

    for chunk in _batches(iter(clips), BATCH_CLIPS * 4):
        yield from zip(chunk, pool.map(load, chunk))


def quiet_clips(
    dataset: Dataset, features: FeatureConfig, below_db: float, workers: int | None = None
) -> tuple[list[tuple[Clip, float]], list[str]]:
    """Read every recorded clip as training hears it: (clip, level) for each whose loudest 0.1 s is
    below `below_db` dBFS (most likely no audible word: a spoken word's is about -35 to -5), and one
    line per file that could not be read."""
    quiet, unreadable = [], []
    spoken = [clip for clip in dataset.clips if clip.level_db is None]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for clip, waveform in load_clips(pool, spoken, features):
            if isinstance(waveform, str):
                unreadable.append(waveform)
            elif (level := loudest_db(waveform, features.sample_rate // 10)) < below_db:
                quiet.append((clip, level))
    return quiet, unreadable


def _batches(items: Iterator, size: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def _write_split(
    folder: Path,
    split: str,
    loaded: Iterator,
    label_index: dict[str, int],
    on_skip: Callable[[str], None],
    on_progress: Callable[[int], None] | None,
) -> int:
    """Write a split's files a batch at a time as its clips are read (`load_clips`); the clips stored."""
    labels = []
    with open(folder / f"{split}.waveforms", "wb") as store, open(folder / f"{split}.jsonl", "w") as lines:
        for batch in _batches(loaded, BATCH_CLIPS):
            good = []
            for clip, waveform in batch:
                if isinstance(waveform, str):
                    on_skip(waveform)
                else:
                    good.append((clip, waveform))
            if good:
                append_waveforms(store, np.stack([waveform for _, waveform in good]))
                lines.write("".join(json.dumps(clip.to_dict()) + "\n" for clip, _ in good))
                labels.extend(label_index[clip.label] for clip, _ in good)
            if on_progress:
                on_progress(len(batch))
    np.save(folder / f"{split}.labels.npy", np.array(labels, dtype=np.int64))
    return len(labels)


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing any earlier cache only once the new one is complete."""
    if target.exists():
        if not (target / "cache.json").is_file() and any(target.iterdir()):
            raise CacheError(f"{target}: exists and is not a kws feature cache; choose another --out")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _jsonable(config: object) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def load_feature_cache(folder: str | os.PathLike, features: FeatureConfig | None = None) -> tuple[dict, dict]:
    """Read a cache: (manifest, {split: CachedSplit}). Refuses one made with other `features` settings."""
    folder = Path(folder)
    manifest_path = folder / "cache.json"
    if not manifest_path.is_file():
        raise CacheError(f"{folder}: not a feature cache (no cache.json); make one with `kws extract`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CacheError(f"{manifest_path}: unreadable ({error.msg})") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{folder}: cache format {manifest.get('format')} is not {CACHE_FORMAT}; extract again")
    if features is not None and manifest["feature_fingerprint"] != features.fingerprint():
        differences = [
            f"{key} {manifest['features'].get(key)!r} != {value!r}"
            for key, value in features.to_dict().items()
            if manifest["features"].get(key) != value
        ]
        raise CacheError(f"{folder}: made with other feature settings ({'; '.join(differences)}); extract again")
    splits = {}
    for split, info in manifest["splits"].items():
        store = WaveformStore(folder / f"{split}.waveforms", manifest["clip_samples"])
        labels = torch.from_numpy(np.load(folder / f"{split}.labels.npy"))
        if not len(store) == len(labels) == info["clips"]:
            raise CacheError(f"{folder}: {split} holds {len(store)} waveforms and {len(labels)} labels, "
                             f"not {info['clips']}; extract again")  # fmt: skip
        splits[split] = CachedSplit(store, labels, folder / f"{split}.jsonl")
    return manifest, splits
