"""The real recordings in ../shared/data: the counts its README gives, speaker-disjoint splits, usable audio.

Skipped when the data is absent.
"""

import functools
import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from kws.config import DataConfig, FeatureConfig, load_recipe
from kws.data import SILENCE, SPLITS, UNKNOWN, load_clip, load_dataset
from kws.features import FrontEnd

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# The data README's table: clips per split (training, validation, testing).
README_COUNTS = {
    "yes": (583, 115, 113), "no": (588, 118, 102), "up": (590, 99, 121), "down": (587, 110, 105),
    "left": (586, 117, 104), "right": (570, 116, 108), "stop": (571, 108, 114),
    # go, on, off and the 25 other words
    UNKNOWN: (601 + 214 + 205 + 472, 111 + 42 + 61 + 110, 96 + 35 + 38 + 76),
}  # fmt: skip


@functools.cache
def load_real(folder: Path):
    """Each real dataset is listed once per test run."""
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return load_dataset(DataConfig(), folder)


@pytest.fixture
def speech_commands(shared_data):
    return load_real(shared_data / "speech_commands")


@pytest.fixture
def fsdd(shared_data):
    return load_real(shared_data / "fsdd")


def split_counts(dataset, label: str) -> tuple[int, ...]:
    counts = Counter(clip.split for clip in dataset.clips if clip.label == label)
    return tuple(counts[split] for split in SPLITS)


def test_speech_commands_default_labels_are_silence_unknown_and_seven_keywords(speech_commands):
    assert speech_commands.layout == "speech_commands"
    assert speech_commands.labels == (SILENCE, UNKNOWN, "yes", "no", "up", "down", "left", "right", "stop")
    assert len(speech_commands.noise_files) == 6


@pytest.mark.parametrize("label", list(README_COUNTS))
def test_speech_commands_split_counts_match_the_data_readme(speech_commands, label):
    assert split_counts(speech_commands, label) == README_COUNTS[label]


def test_speech_commands_totals_match_the_data_readme(speech_commands):
    spoken = [clip for clip in speech_commands.clips if clip.label != SILENCE]
    assert len(spoken) == 7686
    assert tuple(Counter(clip.split for clip in spoken)[split] for split in SPLITS) == (5567, 1107, 1012)
    # One silence clip per ten word clips of each split.
    assert split_counts(speech_commands, SILENCE) == (557, 111, 101)


def test_speech_commands_speakers_never_appear_in_two_splits(speech_commands):
    splits = defaultdict(set)
    for clip in speech_commands.clips:
        if clip.label != SILENCE:
            splits[clip.speaker].add(clip.split)
    assert all(len(found) == 1 for found in splits.values())
    assert len(splits) > 1000


def readme_split_rule(speaker: str) -> str:
    """The data README's rule: sha1 of "kws-split:" + speaker, modulo 10000, / 100."""
    percent = int(hashlib.sha1(f"kws-split:{speaker}".encode()).hexdigest(), 16) % 10000 / 100
    return "validation" if percent < 15 else "testing" if percent < 30 else "training"


def test_speech_commands_splits_follow_the_data_readmes_speaker_rule(speech_commands):
    spoken = [clip for clip in speech_commands.clips if clip.label != SILENCE]
    assert all(clip.split == readme_split_rule(clip.speaker) for clip in spoken)


def test_shipped_speech_commands_recipe_reads_the_real_data(shared_data):
    folder = shared_data / "speech_commands"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    recipe = load_recipe(RECIPES / "speech_commands.yaml", [f"data.path={folder}"])
    dataset = load_dataset(recipe.data)
    assert dataset.labels == (SILENCE, UNKNOWN, "yes", "no", "up", "down", "left", "right", "stop")
    assert split_counts(dataset, "yes") == README_COUNTS["yes"]


def test_fsdd_has_four_speakers_and_2000_clips_and_holds_out_whole_speakers(fsdd):
    assert fsdd.layout == "fsdd"
    assert fsdd.labels == tuple(str(digit) for digit in range(10))
    assert len(fsdd.clips) == 2000
    speakers = Counter(clip.speaker for clip in fsdd.clips)
    assert speakers == {"george": 500, "jackson": 500, "nicolas": 500, "theo": 500}
    splits = {(clip.speaker, clip.split) for clip in fsdd.clips}
    assert splits == {("george", "training"), ("jackson", "training"), ("nicolas", "validation"),
                      ("theo", "testing")}  # fmt: skip


def test_real_clips_load_and_give_finite_features(speech_commands, fsdd):
    config = FeatureConfig()
    picks = [
        next(clip for clip in speech_commands.clips if clip.label == "yes"),
        next(clip for clip in speech_commands.clips if clip.label == UNKNOWN),
        next(clip for clip in fsdd.clips if clip.label == "7"),  # 8 kHz, resampled
    ]
    silence = [clip for clip in speech_commands.clips if clip.label == SILENCE][:3]
    waveforms = [load_clip(clip, config.sample_rate, config.clip_samples) for clip in picks + silence]
    for clip, waveform in zip(picks, waveforms, strict=False):
        assert waveform.shape == (16000,) and np.isfinite(waveform).all()
        assert 1e-3 < np.sqrt(np.mean(waveform**2)) < 1, clip
    for clip, waveform in zip(silence, waveforms[len(picks) :], strict=True):
        rms_db = 20 * np.log10(np.sqrt(np.mean(waveform.astype(np.float64) ** 2)))
        assert rms_db == pytest.approx(clip.level_db, abs=0.01)
    with torch.no_grad():
        features = FrontEnd(config)(torch.from_numpy(np.stack(waveforms)))
    assert features.shape == (6, 40, 101)
    assert torch.isfinite(features).all()
    # Speech stands well above the log floor (-60 dB) somewhere in each spoken clip.
    assert (features[: len(picks)].amax(dim=(1, 2)) > -20).all()
