"""Feature caches: a dataset's waveforms and front-end features, per split, keyed by the FeatureConfig.

A cache folder holds `cache.json` (settings, their fingerprint, labels, counts, skipped files) and,
per split, `<split>.safetensors` (features float32 (clips, n_features, frames), waveforms float16
(clips, samples), label indices int64) and `<split>.jsonl` (one line per clip, in the same order).
It is written to a temporary folder and moved into place whole, so an interrupted run leaves
nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kws import __version__
from kws.audio import loudest_db
from kws.config import DataConfig, FeatureConfig
from kws.data import SPLITS, Clip, Dataset, load_clip
from kws.errors import AudioError, CacheError
from kws.features import FrontEnd

CACHE_FORMAT = 1
BATCH_CLIPS = 256


@dataclass
class ExtractResult:
    """What an extraction did: clips stored per split, and one line per file that was skipped."""

    out_dir: Path
    stored: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    up_to_date: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class CachedSplit:
    """One split read back from a cache."""

    features: torch.Tensor  # (clips, n_features, frames) float32
    waveforms: torch.Tensor  # (clips, samples) float16
    labels: torch.Tensor  # (clips,) int64 indices into the cache's labels
    clips: list[dict]


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
    """Compute and store features for every clip of `dataset`, split by split.

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
        if manifest.get("dataset_fingerprint") == fingerprint:
            stored = {split: info["clips"] for split, info in manifest["splits"].items()}
            return ExtractResult(out_dir, stored, manifest.get("skipped", []), up_to_date=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    result = ExtractResult(out_dir)
    front_end = FrontEnd(features)
    label_index = {label: index for index, label in enumerate(dataset.labels)}
    try:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            for split in SPLITS:
                clips = dataset.split(split)
                feature_parts, waveform_parts, kept = [], [], []
                for batch in _batches(load_clips(pool, clips, features), BATCH_CLIPS):
                    good = []
                    for clip, waveform in batch:
                        if isinstance(waveform, str):
                            result.skipped.append(waveform)
                            if on_skip:
                                on_skip(waveform)
                        else:
                            good.append((clip, waveform))
                    if good:
                        waveforms = torch.from_numpy(np.stack([waveform for _, waveform in good]))
                        with torch.no_grad():
                            feature_parts.append(front_end(waveforms).contiguous())
                        waveform_parts.append(waveforms.to(torch.float16))
                        kept.extend(clip for clip, _ in good)
                    if on_progress:
                        on_progress(len(batch))
                _write_split(staging, split, features, feature_parts, waveform_parts, kept, label_index)
                result.stored[split] = len(kept)
        manifest = {
            "format": CACHE_FORMAT,
            "kws_version": __version__,
            "features": features.to_dict(),
            "feature_fingerprint": features.fingerprint(),
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
    features: FeatureConfig,
    feature_parts: list[torch.Tensor],
    waveform_parts: list[torch.Tensor],
    clips: list[Clip],
    label_index: dict[str, int],
) -> None:
    frames = features.num_frames(features.clip_samples)
    tensors = {
        "features": torch.cat(feature_parts) if feature_parts else torch.zeros(0, features.n_features, frames),
        "waveforms": torch.cat(waveform_parts) if waveform_parts else torch.zeros(0, features.clip_samples),
        "labels": torch.tensor([label_index[clip.label] for clip in clips], dtype=torch.int64),
    }
    save_file(tensors, str(folder / f"{split}.safetensors"))
    lines = (json.dumps(clip.to_dict()) for clip in clips)
    (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))


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
    for split in manifest["splits"]:
        tensors = load_file(str(folder / f"{split}.safetensors"))
        lines = (folder / f"{split}.jsonl").read_text().splitlines()
        splits[split] = CachedSplit(
            tensors["features"], tensors["waveforms"], tensors["labels"], [json.loads(line) for line in lines]
        )
    return manifest, splits
