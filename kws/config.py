"""Recipes and every setting a run takes: frozen dataclasses loaded from YAML, validated on load, with
command-line overrides. This module imports no torch, so reading and checking a recipe is cheap."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kws.errors import ConfigError
from kws.settings import build

LAYOUTS = ("auto", "speech_commands", "fsdd", "folder", "manifest")
FEATURE_KINDS = ("logmel", "stft", "mfcc")
NORMALIZATIONS = ("none", "mean", "meanvar")
# The model architectures kws.models registers (a test checks the two agree).
ARCHITECTURE_NAMES = ("resnet", "firnet")


def expand_path(text: str | os.PathLike) -> Path:
    """A path as written in a recipe or on the command line, with `$VARIABLES` and `~` expanded."""
    return Path(os.path.expandvars(str(text))).expanduser()


@dataclass(frozen=True)
class ExtraWords:
    """More training clips: word folders of another dataset (Speech Commands layout), under this recipe's labels.

    With few speakers, other people saying the same words are the best augmentation there is: the FSDD
    recipe takes the digits of Speech Commands' speakers, heard as if recorded at FSDD's 8 kHz.
    """

    path: str  # a folder of word folders, e.g. ../shared/data/speech_commands
    words: tuple[str, ...]  # the word folders to take
    labels: tuple[str, ...] = ()  # the label each folder's clips get, in the same order; () = the folder names
    sample_rate: int | None = None  # heard as if recorded at this rate: nothing above half of it is kept

    def __post_init__(self) -> None:
        if not self.words:
            raise ConfigError("data.extra_words: words must name at least one folder")
        if self.labels and len(self.labels) != len(self.words):
            raise ConfigError(
                f"data.extra_words: {len(self.labels)} labels for {len(self.words)} words (one label per word)"
            )
        if self.sample_rate is not None and self.sample_rate < 1000:
            raise ConfigError(f"data.extra_words.sample_rate: must be at least 1000 Hz (got {self.sample_rate})")

    def label_of(self) -> dict[str, str]:
        return dict(zip(self.words, self.labels or self.words))


@dataclass(frozen=True)
class DataConfig:
    """Which clips a run uses and how they are split; the `data:` section of a recipe."""

    path: str | None = None  # dataset folder or manifest (CSV/JSONL); the command line may give it instead
    layout: str = "auto"  # auto | speech_commands | fsdd | folder | manifest
    words: tuple[str, ...] = ()  # keywords; () = the layout's default. Other labels become _unknown_
    unknown: bool = True  # keep clips of other words, labelled _unknown_
    silence_fraction: float = 0.1  # _silence_ clips per split, as a fraction of that split's word clips
    silence_db_range: tuple[float, ...] = (-80.0, -30.0)  # RMS level of silence clips, dBFS
    noise_dir: str | None = None  # background noise folder; None = `_background_noise_` inside `path`
    validation_speakers: tuple[str, ...] = ()  # held-out speakers, for layouts without split lists
    testing_speakers: tuple[str, ...] = ()
    validation_percent: float = 10.0  # hash split, when neither lists nor held-out speakers are given
    testing_percent: float = 10.0
    seed: int = 0  # where silence clips are cut and how loud they are
    # More negatives: every training keyword clip played backwards, as _unknown_; it sounds like
    # speech with the keyword's spectrum but is no keyword.
    reversed_unknown: bool = False
    extra_unknown: tuple[str, ...] = ()  # folders of other speech (any layout), every clip _unknown_, training only
    extra_words: tuple[ExtraWords, ...] = ()  # more training clips of the recipe's words, from other datasets
    # Long recordings of speech in which no keyword is said (folders, or manifests whose training rows
    # are taken): each epoch, windows cut from them at random offsets train as _unknown_
    # (train.negative_speech_ratio says how many), so continuous speech, not only single words, is heard.
    negative_speech: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout: must be one of {', '.join(LAYOUTS)} (got {self.layout!r})")
        if not 0 <= self.silence_fraction <= 10:
            raise ConfigError(f"data.silence_fraction: must be between 0 and 10 (got {self.silence_fraction})")
        low_high = self.silence_db_range
        if len(low_high) != 2 or not low_high[0] <= low_high[1] <= 0:
            raise ConfigError(f"data.silence_db_range: expected [low, high] dBFS, low <= high <= 0 (got {low_high})")
        if not (0 <= self.validation_percent and 0 <= self.testing_percent
                and self.validation_percent + self.testing_percent < 100):  # fmt: skip
            raise ConfigError("data.validation_percent + data.testing_percent: must be below 100")
        overlap = set(self.validation_speakers) & set(self.testing_speakers)
        if overlap:
            raise ConfigError(f"data: speaker(s) both in validation and testing: {', '.join(sorted(overlap))}")

    def own_recordings(self) -> DataConfig:
        """These settings without the clips borrowed for training (reversed, extra_unknown, extra_words,
        negative_speech)."""
        return replace(self, reversed_unknown=False, extra_unknown=(), extra_words=(), negative_speech=())


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of the front end; saved in every feature cache and checkpoint.

    Frames are centred: frame t covers the `window_ms` around t * `hop_ms` (the signal is padded with
    zeros by n_fft // 2 on both sides, as librosa does with center=True). Log features are in dB,
    10 * log10(max(power, log_floor)). `normalization` subtracts each feature's mean over the clip
    ("mean") and also divides by its standard deviation ("meanvar").
    """

    sample_rate: int = 16000
    clip_s: float = 1.0  # the model's window: every training clip is padded or cut to this length
    window_ms: float = 30.0
    hop_ms: float = 10.0
    n_fft: int | None = None  # None: the next power of two that holds the window
    kind: str = "logmel"
    n_mels: int = 40
    n_mfcc: int = 40
    f_min: float = 20.0
    f_max: float | None = None  # None: half the sample rate
    log_floor: float = 1e-6
    normalization: str = "none"

    def __post_init__(self) -> None:
        # 30 and 30.0 are the same setting: store floats so the fingerprint does not tell them apart.
        for key in ("clip_s", "window_ms", "hop_ms", "f_min", "f_max", "log_floor"):
            value = getattr(self, key)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, key, float(value))

        def fail(key: str, problem: str) -> None:
            raise ConfigError(f"features.{key}: {problem} (got {getattr(self, key)!r})")

        if self.sample_rate <= 0:
            fail("sample_rate", "must be a positive number of Hz")
        for key in ("clip_s", "window_ms", "hop_ms", "log_floor"):
            if not getattr(self, key) > 0:
                fail(key, "must be positive")
        if self.kind not in FEATURE_KINDS:
            fail("kind", f"must be one of {', '.join(FEATURE_KINDS)}")
        if self.normalization not in NORMALIZATIONS:
            fail("normalization", f"must be one of {', '.join(NORMALIZATIONS)}")
        if self.win_length < 2:
            fail("window_ms", "is shorter than two samples")
        if self.hop_length < 1:
            fail("hop_ms", "is shorter than one sample")
        if self.n_fft is not None and self.n_fft < self.win_length:
            fail("n_fft", f"must be at least the window length ({self.win_length} samples)")
        if self.n_mels < 1:
            fail("n_mels", "must be at least 1")
        if self.kind == "mfcc" and not 1 <= self.n_mfcc <= self.n_mels:
            fail("n_mfcc", f"must be between 1 and n_mels ({self.n_mels})")
        if not 0 <= self.f_min < self.f_max_hz:
            fail("f_min", f"must be at least 0 and below f_max ({self.f_max_hz} Hz)")
        if self.f_max_hz > self.sample_rate / 2:
            fail("f_max", f"must not exceed half the sample rate ({self.sample_rate / 2} Hz)")

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.window_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def fft_size(self) -> int:
        return self.n_fft if self.n_fft is not None else 1 << math.ceil(math.log2(self.win_length))

    @property
    def f_max_hz(self) -> float:
        return self.f_max if self.f_max is not None else self.sample_rate / 2

    @property
    def clip_samples(self) -> int:
        return round(self.clip_s * self.sample_rate)

    @property
    def n_features(self) -> int:
        return {"logmel": self.n_mels, "stft": self.fft_size // 2 + 1, "mfcc": self.n_mfcc}[self.kind]

    def num_frames(self, num_samples: int) -> int:
        """Frames the front end yields for `num_samples` samples of audio."""
        padded = num_samples + 2 * (self.fft_size // 2)
        return 1 + (padded - self.fft_size) // self.hop_length

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """A short hash of every setting, so a cache made with other settings is recognised."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# name -> (architecture, arguments). Parameter counts are for 9 classes and 40 mel bands.
PRESETS: dict[str, tuple[str, dict]] = {
    "resnet_tiny": ("resnet", {"widths": (8, 12, 16, 24), "stem_pool": (2, 1)}),  # ~17K parameters
    "resnet_small": ("resnet", {"widths": (16, 24, 32, 48), "stem_pool": (2, 1)}),  # ~68K
    "resnet_medium": ("resnet", {"widths": (24, 32, 48, 64), "stem_pool": (2, 1)}),  # ~133K
    "resnet_base": ("resnet", {"widths": (32, 48, 64, 96), "stem_pool": (2, 1)}),  # ~269K
    # As wide as resnet_base at the cost of resnet_small: the stem also halves the frame rate.
    "resnet_wide": ("resnet", {"widths": (32, 48, 64, 96), "stem_pool": (2, 2)}),  # ~269K
    "firnet_small": ("firnet", {"widths": (48, 48, 64, 96)}),
    "firnet_base": ("firnet", {"widths": (64, 64, 96, 128)}),  # ~205K
    "firnet_wide": ("firnet", {"widths": (128, 128, 192, 256)}),  # ~790K
}


@dataclass(frozen=True)
class ModelConfig:
    """The `model:` section of a recipe: a preset (or architecture) name and its regularisation."""

    name: str = "resnet_small"
    dropout: float = 0.3
    fir_init: str = "mel"  # firnet only: "mel" (band-pass filters on the mel scale) or "random"

    def __post_init__(self) -> None:
        if self.name not in PRESETS and self.name not in ARCHITECTURE_NAMES:
            known = ", ".join([*PRESETS, *ARCHITECTURE_NAMES])
            raise ConfigError(f"model.name: {self.name!r} is not a model kws knows ({known})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1) (got {self.dropout})")
        if self.fir_init not in ("mel", "random"):
            raise ConfigError(f"model.fir_init: must be mel or random (got {self.fir_init!r})")

    def architecture(self) -> tuple[str, dict]:
        """(architecture name, constructor arguments) for this configuration."""
        architecture, arguments = PRESETS.get(self.name, (self.name, {}))
        arguments = {**arguments, "dropout": self.dropout}
        if architecture == "firnet":
            arguments["init"] = self.fir_init
        return architecture, arguments


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time changes to each clip; validation and test clips are never augmented."""

    time_shift_ms: float = 100.0  # shift the clip by up to this much either way, filling with silence
    gain_db_range: tuple[float, ...] = (-10.0, 6.0)  # change the clip's level
    speed_range: tuple[float, ...] = (0.9, 1.1)  # resample: faster/slower and higher/lower voice together
    noise_probability: float = 0.8  # mix in a crop of training background noise
    noise_db_range: tuple[float, ...] = (-70.0, -35.0)  # RMS level of the mixed noise, dBFS
    # Room reverberation (before noise and gain): a synthetic room response, exponentially decaying
    # noise behind the direct sound, its RT60 (time to fall 60 dB) uniform in the range, in s.
    reverb_probability: float = 0.0
    reverb_rt60_s_range: tuple[float, ...] = (0.2, 0.8)
    freq_masks: int = 2  # SpecAugment (2D model only): masks of up to `freq_mask_bands` bands
    freq_mask_bands: int = 5
    time_masks: int = 2  # ... and of up to `time_mask_frames` frames
    time_mask_frames: int = 10

    def __post_init__(self) -> None:
        for key in ("gain_db_range", "speed_range", "noise_db_range", "reverb_rt60_s_range"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or low_high[0] > low_high[1]:
                raise ConfigError(f"train.augment.{key}: expected [low, high] (got {list(low_high)})")
        if self.speed_range[0] <= 0:
            raise ConfigError("train.augment.speed_range: speeds must be positive")
        if not 0 <= self.noise_probability <= 1:
            raise ConfigError("train.augment.noise_probability: must be between 0 and 1")
        if not 0 <= self.reverb_probability <= 1:
            raise ConfigError("train.augment.reverb_probability: must be between 0 and 1")
        if not 0 < self.reverb_rt60_s_range[0] <= self.reverb_rt60_s_range[1] <= 3:
            raise ConfigError("train.augment.reverb_rt60_s_range: RT60s between 0 and 3 s")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015): learn the labels and, alongside, the softened
    probabilities that trained models (the teachers) give each augmented training clip."""

    # Trained models with the recipe's labels: files, run folders or shipped names, as for --init. With
    # several, their probabilities are averaged. Empty: no distillation.
    teachers: tuple[str, ...] = ()
    temperature: float = 2.0  # both sides' logits are divided by this before the softmax
    weight: float = 0.5  # the teachers' share of the loss; the labels have the rest
    # Distil only the clips whose label is the teachers' top class. A teacher that never heard
    # continuous speech takes some of it for keywords: it then teaches the words and the labels alone
    # teach rejection.
    agreeing_only: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"train.distill.temperature: must be positive (got {self.temperature})")
        if not 0 <= self.weight <= 1:
            raise ConfigError(f"train.distill.weight: must be between 0 and 1 (got {self.weight})")


@dataclass(frozen=True)
class TrainConfig:
    """The `train:` section of a recipe."""

    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.05
    unknown_ratio: float = 1.0  # _unknown_ clips drawn per epoch, relative to the mean keyword class
    silence_ratio: float = 1.0  # the same for _silence_
    # Windows of data.negative_speech drawn per epoch (as _unknown_), relative to the mean keyword class.
    negative_speech_ratio: float = 1.0
    # Each negative-speech window is the most keyword-like, to the model being trained, of this many cut
    # 100 ms apart along one stretch of a recording (max-pooling over time); 1: a window at random.
    negative_speech_candidates: int = 1
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: torch's default)
    # mixup (Zhang et al. 2018): train on pairs of clips blended, with their labels blended alike, the
    # share drawn from Beta(alpha, alpha); 0.1-0.4 is usual, 0 leaves it out.
    mixup_alpha: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size: must be at least 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate: must be positive (got {self.learning_rate})")
        if self.unknown_ratio < 0 or self.silence_ratio < 0 or self.negative_speech_ratio < 0:
            raise ConfigError("train.unknown_ratio, silence_ratio and negative_speech_ratio: must not be negative")
        if self.negative_speech_candidates < 1:
            raise ConfigError(
                f"train.negative_speech_candidates: must be at least 1 (got {self.negative_speech_candidates})"
            )
        if self.mixup_alpha < 0:
            raise ConfigError(f"train.mixup_alpha: must not be negative (got {self.mixup_alpha})")


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 reads the keywords yes, no, on and off as booleans."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


@dataclass(frozen=True)
class Recipe:
    """Everything a run needs, section by section, as written in `recipes/*.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`features.n_mels=64` -> (["features", "n_mels"], 64); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. features.n_mels=64")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: the key is empty")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Return a copy of nested `values` with each KEY=VALUE override set."""
    result = _deep_copy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(values: dict) -> dict:
    return {key: _deep_copy(value) if isinstance(value, dict) else value for key, value in values.items()}


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        values = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (data, features, ...)")
    return values


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (or the defaults when `path` is None), apply overrides, validate everything.

    Relative paths in a recipe's `data:` section are taken relative to the folder holding the recipe;
    environment variables in them are expanded.
    """
    values = read_yaml(path) if path is not None else {}
    data = values.get("data")
    if path is not None and isinstance(data, dict):
        folder = Path(path).parent
        for key in ("path", "noise_dir"):
            if isinstance(data.get(key), str):
                data[key] = _relative_to(folder, data[key])
        for key in ("extra_unknown", "negative_speech"):
            if isinstance(data.get(key), list):
                data[key] = [_relative_to(folder, item) if isinstance(item, str) else item for item in data[key]]
        if isinstance(data.get("extra_words"), list):
            data["extra_words"] = [{**item, "path": _relative_to(folder, item["path"])}
                                   if isinstance(item, dict) and isinstance(item.get("path"), str) else item
                                   for item in data["extra_words"]]  # fmt: skip
    values = apply_overrides(values, overrides or [])
    source = str(path) if path is not None else "the default recipe"
    try:
        return build(Recipe, values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _relative_to(folder: Path, text: str) -> str:
    path = expand_path(text)
    return str(path if path.is_absolute() else folder / path)
