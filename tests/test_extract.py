"""Feature caches: per-split features equal the front end on each clip, written whole or not at all."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kws.config import DataConfig, FeatureConfig
from kws.data import SILENCE, SPLITS, load_clip, load_dataset
from kws.errors import CacheError
from kws.extract import extract_features, load_feature_cache
from kws.features import FrontEnd

FEATURES = FeatureConfig(clip_s=0.5)
DATA = DataConfig(words=("yes",), silence_fraction=0.5)
SPEAKERS = {"aaaa0001": "training", "aaaa0002": "training", "bbbb0001": "validation", "cccc0001": "testing"}


@pytest.fixture
def dataset_folder(tmp_path, write_wav, tone, chirp, noise) -> Path:
    """yes/ and no/ clips of several lengths and rates, one noise recording, and split lists."""
    root = tmp_path / "words"
    for index, speaker in enumerate(SPEAKERS):
        write_wav(root / "yes" / f"{speaker}_nohash_0.wav", tone(300 + 100 * index, 0.3), 16000)
        write_wav(root / "yes" / f"{speaker}_nohash_1.wav", chirp(200, 3000, 0.7, rate=8000), 8000)
        write_wav(root / "no" / f"{speaker}_nohash_0.wav", noise(0.5, seed=index), 16000)
    write_wav(root / "_background_noise_" / "room.wav", noise(12.0, rms=0.05, seed=99), 16000)
    for split in ("validation", "testing"):
        lines = [f"{word}/{speaker}_nohash_0.wav" for speaker, where in SPEAKERS.items() if where == split
                 for word in ("yes", "no")]  # fmt: skip
        (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def dataset(dataset_folder):
    return load_dataset(DATA, dataset_folder)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_cache_holds_each_splits_clips_in_order_with_the_front_ends_features(dataset, tmp_path):
    out = tmp_path / "cache"
    result = extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert not result.up_to_date and result.skipped == []
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["cache.json", *(f"{split}.{kind}" for split in SPLITS for kind in ("safetensors", "jsonl"))]
    )
    front_end = FrontEnd(FEATURES)
    for split in SPLITS:
        clips = dataset.split(split)
        assert result.stored[split] == len(clips) > 0
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [clip.to_dict() for clip in clips]
        tensors = load_file(str(out / f"{split}.safetensors"))
        assert tensors["features"].shape == (len(clips), 40, 51)
        assert tensors["labels"].tolist() == [dataset.labels.index(clip.label) for clip in clips]
        for index, clip in enumerate(clips):
            waveform = load_clip(clip, FEATURES.sample_rate, FEATURES.clip_samples)
            with torch.no_grad():
                expected = front_end(torch.from_numpy(waveform)[None])[0]
            torch.testing.assert_close(tensors["features"][index], expected, atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(tensors["waveforms"][index], torch.from_numpy(waveform).half())
    assert {clip.label for clip in dataset.clips} >= {SILENCE, "yes"}


def test_cache_manifest_records_settings_labels_and_counts(dataset, tmp_path):
    extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=1)
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["features"] == FEATURES.to_dict()
    assert manifest["feature_fingerprint"] == FEATURES.fingerprint()
    assert manifest["labels"] == list(dataset.labels)
    assert manifest["splits"] == {split: {"clips": len(dataset.split(split))} for split in SPLITS}
    assert manifest["data"]["words"] == ["yes"]


def test_load_feature_cache_reads_back_what_was_stored(dataset, tmp_path):
    extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=2)
    manifest, splits = load_feature_cache(tmp_path / "cache", FEATURES)
    assert manifest["labels"] == list(dataset.labels)
    for split in SPLITS:
        stored = load_file(str(tmp_path / "cache" / f"{split}.safetensors"))
        assert torch.equal(splits[split].features, stored["features"])
        assert splits[split].waveforms.dtype == torch.float16
        assert splits[split].clips == [clip.to_dict() for clip in dataset.split(split)]


def test_second_run_with_the_same_settings_and_files_is_up_to_date(dataset, tmp_path):
    out = tmp_path / "cache"
    first = extract_features(dataset, DATA, FEATURES, out, workers=2)
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    second = extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert second.up_to_date
    assert second.stored == first.stored
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


def test_force_extracts_again_even_when_up_to_date(dataset, tmp_path):
    out = tmp_path / "cache"
    extract_features(dataset, DATA, FEATURES, out, workers=2)
    good = (out / "training.safetensors").read_bytes()
    (out / "training.safetensors").write_bytes(b"spoiled")
    assert extract_features(dataset, DATA, FEATURES, out, workers=2).up_to_date
    result = extract_features(dataset, DATA, FEATURES, out, workers=2, force=True)
    assert not result.up_to_date
    assert (out / "training.safetensors").read_bytes() == good


def test_a_changed_clip_makes_the_cache_stale(dataset_folder, tmp_path, write_wav, tone):
    out = tmp_path / "cache"
    extract_features(load_dataset(DATA, dataset_folder), DATA, FEATURES, out, workers=2)
    write_wav(dataset_folder / "yes" / "aaaa0001_nohash_0.wav", tone(1234, 0.4), 16000)
    dataset = load_dataset(DATA, dataset_folder)
    result = extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert not result.up_to_date
    _, splits = load_feature_cache(out, FEATURES)
    index = [clip["path"] for clip in splits["training"].clips].index(
        str(dataset_folder / "yes" / "aaaa0001_nohash_0.wav")
    )
    waveform = load_clip(dataset.split("training")[index], 16000, 8000)
    torch.testing.assert_close(splits["training"].waveforms[index], torch.from_numpy(waveform).half())


def test_other_feature_settings_change_the_fingerprint_and_extract_again(dataset, tmp_path):
    out = tmp_path / "cache"
    extract_features(dataset, DATA, FEATURES, out, workers=2)
    other = FeatureConfig(clip_s=0.5, kind="mfcc", n_mfcc=13)
    assert not extract_features(dataset, DATA, other, out, workers=2).up_to_date
    _, splits = load_feature_cache(out, other)
    assert splits["training"].features.shape[1] == 13


def test_load_feature_cache_refuses_other_settings_naming_the_one_that_differs(dataset, tmp_path):
    extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=2)
    with pytest.raises(CacheError, match=r"other feature settings \(n_mels 40 != 64\)"):
        load_feature_cache(tmp_path / "cache", FeatureConfig(clip_s=0.5, n_mels=64))
    with pytest.raises(CacheError, match=r"clip_s 0.5 != 1.0"):
        load_feature_cache(tmp_path / "cache", FeatureConfig())


def test_load_feature_cache_of_a_folder_without_a_cache_is_a_cache_error(tmp_path):
    with pytest.raises(CacheError, match="not a feature cache"):
        load_feature_cache(tmp_path)


def interrupt_after_first_batch(clips: int) -> None:
    raise KeyboardInterrupt


def test_interrupted_extraction_leaves_nothing_behind(dataset, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract_features(dataset, DATA, FEATURES, out, workers=2, on_progress=interrupt_after_first_batch)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["words"]


def test_interrupted_extraction_leaves_the_previous_cache_intact(dataset, tmp_path):
    out = tmp_path / "cache"
    extract_features(dataset, DATA, FEATURES, out, workers=2)
    before = folder_bytes(out)
    with pytest.raises(KeyboardInterrupt):
        extract_features(dataset, DATA, FEATURES, out, workers=2, force=True, on_progress=interrupt_after_first_batch)
    assert folder_bytes(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "words"]
    assert extract_features(dataset, DATA, FEATURES, out, workers=2).up_to_date


def test_out_folder_that_is_not_a_cache_and_holds_files_is_refused(dataset, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a kws feature cache"):
        extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert folder_bytes(out) == {"notes.txt": b"keep me"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results", "words"]


def test_an_empty_out_folder_is_used(dataset, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert (out / "cache.json").is_file()


def test_unreadable_files_are_skipped_named_and_the_rest_stored(dataset_folder, tmp_path):
    broken = dataset_folder / "yes" / "dddd0001_nohash_0.wav"
    broken.write_bytes(b"")
    dataset = load_dataset(DATA, dataset_folder)
    skipped = []
    result = extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=2, on_skip=skipped.append)
    assert skipped == result.skipped == [f"{broken}: empty file (0 bytes)"]
    stored = sum(result.stored.values())
    assert stored == len(dataset.clips) - 1
    manifest, splits = load_feature_cache(tmp_path / "cache", FEATURES)
    assert manifest["skipped"] == skipped
    assert sum(len(split.clips) for split in splits.values()) == stored
    assert str(broken) not in [clip["path"] for split in splits.values() for clip in split.clips]
