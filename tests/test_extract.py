"""Feature caches: each split's clips as training hears them, in a store on disk read back row by row,
written a batch at a time and moved into place whole or not at all."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kws.extract
from kws.config import DataConfig, FeatureConfig
from kws.data import SILENCE, SPLITS, load_clip, load_dataset
from kws.errors import CacheError
from kws.extract import WaveformStore, append_waveforms, extract_features, load_feature_cache

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


def test_cache_holds_each_splits_clips_in_order_as_training_hears_them(dataset, tmp_path):
    out = tmp_path / "cache"
    result = extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert not result.up_to_date and result.skipped == []
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["cache.json", *(f"{split}.{kind}" for split in SPLITS for kind in ("waveforms", "labels.npy", "jsonl"))]
    )
    for split in SPLITS:
        clips = dataset.split(split)
        assert result.stored[split] == len(clips) > 0
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [clip.to_dict() for clip in clips]
        assert np.load(out / f"{split}.labels.npy").tolist() == [dataset.labels.index(clip.label) for clip in clips]
        # The store is plain float16 rows: any tool reads it back (numpy here, independently of kws).
        stored = np.fromfile(out / f"{split}.waveforms", dtype="<f2").reshape(len(clips), FEATURES.clip_samples)
        for index, clip in enumerate(clips):
            waveform = load_clip(clip, FEATURES.sample_rate, FEATURES.clip_samples)
            np.testing.assert_array_equal(stored[index], waveform.astype(np.float16))
    assert {clip.label for clip in dataset.clips} >= {SILENCE, "yes"}


def test_cache_manifest_records_settings_labels_and_counts(dataset, tmp_path):
    extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=1)
    manifest = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert manifest["features"] == FEATURES.to_dict()
    assert manifest["feature_fingerprint"] == FEATURES.fingerprint()
    assert manifest["clip_samples"] == FEATURES.clip_samples
    assert manifest["labels"] == list(dataset.labels)
    assert manifest["splits"] == {split: {"clips": len(dataset.split(split))} for split in SPLITS}
    assert manifest["data"]["words"] == ["yes"]


def test_load_feature_cache_reads_back_exactly_what_was_extracted(dataset, tmp_path):
    extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=2)
    manifest, splits = load_feature_cache(tmp_path / "cache", FEATURES)
    assert manifest["labels"] == list(dataset.labels)
    for split in SPLITS:
        clips = dataset.split(split)
        store = splits[split].waveforms
        assert len(store) == len(clips)
        expected = np.stack([load_clip(clip, FEATURES.sample_rate, FEATURES.clip_samples) for clip in clips])
        every_row = store.read(range(len(store)))
        assert every_row.dtype == torch.float32
        assert torch.equal(every_row, torch.from_numpy(expected).half().float())
        assert torch.equal(torch.cat(list(store.batches(2))), every_row)
        assert splits[split].labels.tolist() == [dataset.labels.index(clip.label) for clip in clips]
        assert splits[split].clips() == [clip.to_dict() for clip in clips]


def made_up_store(path: Path, clips: int = 37, samples: int = 50) -> tuple[WaveformStore, torch.Tensor]:
    """A store of random rows (float16 values, so stored exactly), and the rows in memory."""
    rows = torch.randn(clips, samples, generator=torch.Generator().manual_seed(clips)).half().float()
    with open(path, "wb") as handle:
        append_waveforms(handle, rows[:20])
        append_waveforms(handle, rows[20:].numpy())
    return WaveformStore(path, samples), rows


def test_a_store_reads_any_rows_in_any_order_with_repeats(tmp_path):
    store, rows = made_up_store(tmp_path / "training.waveforms")
    assert len(store) == 37 and store.read([]).shape == (0, 50)
    generator = torch.Generator().manual_seed(0)
    for indices in (torch.arange(37).flip(0), torch.randint(0, 37, (100,), generator=generator),
                    torch.tensor([5, 5, 5]), torch.tensor([36, 0, 1, 2, 30, 31, 3]), [7]):  # fmt: skip
        assert torch.equal(store.read(indices), rows[indices])


def test_a_store_refuses_rows_it_does_not_hold_and_a_file_cut_short(tmp_path):
    store, _ = made_up_store(tmp_path / "training.waveforms")
    for outside in ([37], [0, -1]):
        with pytest.raises(IndexError):
            store.read(outside)
    with open(store.path, "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(CacheError, match="no whole number of 50-sample clips"):
        WaveformStore(store.path, 50)


def test_a_store_read_only_holds_the_rows_asked_for(tmp_path, monkeypatch):
    store, rows = made_up_store(tmp_path / "training.waveforms", clips=1000)
    read_bytes = []
    preadv = kws.extract.os.preadv

    def counting(descriptor, buffers, offset):
        read_bytes.append(sum(len(buffer) for buffer in buffers))
        return preadv(descriptor, buffers, offset)

    monkeypatch.setattr(kws.extract.os, "preadv", counting)
    assert torch.equal(store.read([900, 3, 4, 5, 3]), rows[[900, 3, 4, 5, 3]])
    assert read_bytes == [3 * store.row_bytes, store.row_bytes]  # 3..5 in one read, then 900


def test_extraction_writes_each_split_as_it_goes_never_holding_it_whole(dataset_folder, tmp_path, monkeypatch):
    """With batches of 2 clips, the store on disk grows by each batch before the next is read."""
    dataset = load_dataset(DATA, dataset_folder)
    monkeypatch.setattr(kws.extract, "BATCH_CLIPS", 2)
    sizes_seen = []

    def staged_store_size(clips: int) -> None:
        (staging,) = tmp_path.glob(".cache.partial-*")
        sizes_seen.append({path.name: path.stat().st_size for path in staging.glob("*.waveforms")})

    extract_features(dataset, DATA, FEATURES, tmp_path / "cache", workers=1, on_progress=staged_store_size)
    row_bytes = 2 * FEATURES.clip_samples
    training = [sizes["training.waveforms"] for sizes in sizes_seen if "validation.waveforms" not in sizes]
    clips = len(dataset.split("training"))
    assert training == [row_bytes * min(2 * batch, clips) for batch in range(1, len(training) + 1)]
    assert len(training) == -(-clips // 2) >= 3


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
    good = (out / "training.waveforms").read_bytes()
    (out / "training.waveforms").write_bytes(b"spoiled")
    assert extract_features(dataset, DATA, FEATURES, out, workers=2).up_to_date
    result = extract_features(dataset, DATA, FEATURES, out, workers=2, force=True)
    assert not result.up_to_date
    assert (out / "training.waveforms").read_bytes() == good


def test_a_changed_clip_makes_the_cache_stale(dataset_folder, tmp_path, write_wav, tone):
    out = tmp_path / "cache"
    extract_features(load_dataset(DATA, dataset_folder), DATA, FEATURES, out, workers=2)
    write_wav(dataset_folder / "yes" / "aaaa0001_nohash_0.wav", tone(1234, 0.4), 16000)
    dataset = load_dataset(DATA, dataset_folder)
    result = extract_features(dataset, DATA, FEATURES, out, workers=2)
    assert not result.up_to_date
    _, splits = load_feature_cache(out, FEATURES)
    index = [clip["path"] for clip in splits["training"].clips()].index(
        str(dataset_folder / "yes" / "aaaa0001_nohash_0.wav")
    )
    waveform = load_clip(dataset.split("training")[index], 16000, 8000)
    assert torch.equal(splits["training"].waveforms.read([index])[0], torch.from_numpy(waveform).half().float())


def test_other_feature_settings_change_the_fingerprint_and_extract_again(dataset, tmp_path):
    out = tmp_path / "cache"
    extract_features(dataset, DATA, FEATURES, out, workers=2)
    other = FeatureConfig(clip_s=0.25)
    assert not extract_features(dataset, DATA, other, out, workers=2).up_to_date
    _, splits = load_feature_cache(out, other)
    assert splits["training"].waveforms.read([0]).shape == (1, 4000)


def test_a_cache_of_an_older_format_is_extracted_again_not_refused(dataset, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    with monkeypatch.context() as older:
        older.setattr(kws.extract, "CACHE_FORMAT", 1)
        extract_features(dataset, DATA, FEATURES, out, workers=2)
    with pytest.raises(CacheError, match="cache format 1 is not 2; extract again"):
        load_feature_cache(out, FEATURES)
    assert not extract_features(dataset, DATA, FEATURES, out, workers=2).up_to_date
    manifest, _ = load_feature_cache(out, FEATURES)
    assert manifest["format"] == 2


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
    assert sum(len(split.clips()) for split in splits.values()) == stored
    assert str(broken) not in [clip["path"] for split in splits.values() for clip in split.clips()]
