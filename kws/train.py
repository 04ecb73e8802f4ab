"""Training: Adam with warm-up and a cosine schedule, waveform and SpecAugment augmentation, class
balancing, validation every epoch, best and last checkpoints, resumable runs.

A run folder holds `best.safetensors` (the model with the best validation accuracy),
`state.safetensors` (the last epoch's model with everything needed to resume, written atomically as one
file), `metrics.csv`, `metrics.json`, `report.json` and `curves.png`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import scipy.special
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from kws.audio import load_audio
from kws.checkpoint import ModelInfo, load_model, read_info, save_checkpoint
from kws.config import AugmentConfig, DistillConfig, Recipe, TrainConfig
from kws.data import NOISE_SPLIT_SPANS, SILENCE, UNKNOWN, Dataset, load_dataset, negative_speech_files
from kws.distributed import Processes
from kws.errors import ConfigError, KWSError
from kws.evaluate import EvaluationReport, evaluate_waveforms
from kws.extract import WaveformStore, default_cache_dir, extract_features, load_feature_cache
from kws.models import build_model, count_parameters
from kws.onnx_model import require_layers
from kws.stream import is_keyword

RUN_STATE = "state.safetensors"  # the one file a run is resumed from
ONE_PROCESS = Processes()
NEGATIVE_SPEECH_HOP_S = 0.1  # train.negative_speech_candidates' windows lie as far apart as a stream scores them


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    validation_accuracy: float | None  # None without a validation split
    learning_rate: float
    seconds: float


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_validation_accuracy: float | None  # None without a validation split
    history: list[EpochRecord]
    test: EvaluationReport | None
    parameters: int


@dataclass
class SplitData:
    waveforms: WaveformStore  # on disk, read a batch at a time
    labels: torch.Tensor  # (clips,) int64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KWSError("--device cuda: no CUDA device is available here")
    if name not in ("cpu", "cuda"):
        raise KWSError(f"--device {name}: use auto, cpu or cuda")
    return torch.device(name)


def load_training_data(
    recipe: Recipe, cache_root: Path, workers: int | None = None
) -> tuple[Dataset, dict[str, SplitData], list[str]]:
    """The recipe's dataset, through the feature cache (extracted first when missing, stale or of an older
    format); the waveforms stay on disk."""
    dataset = load_dataset(recipe.data)
    cache_dir = default_cache_dir(dataset, recipe.features, cache_root)
    result = extract_features(dataset, recipe.data, recipe.features, cache_dir, workers=workers)
    _, splits = load_feature_cache(cache_dir, recipe.features)
    data = {name: SplitData(split.waveforms, split.labels) for name, split in splits.items()}
    return dataset, data, result.skipped


def mean_keyword_clips(labels: torch.Tensor, names: tuple[str, ...]) -> float:
    """Training clips of the average keyword class: the unit the other classes' draws are given in."""
    counts = torch.bincount(labels, minlength=len(names)).float()
    keyword_ids = [i for i, name in enumerate(names) if name not in (SILENCE, UNKNOWN) and counts[i] > 0]
    return float(counts[keyword_ids].mean() if keyword_ids else counts.mean())


def class_sampling_weights(labels: torch.Tensor, names: tuple[str, ...], config: TrainConfig) -> torch.Tensor:
    """Per-clip weights so an epoch draws keywords as they are, and _unknown_ / _silence_ at the
    configured multiple of the mean keyword class size."""
    counts = torch.bincount(labels, minlength=len(names)).float()
    mean_keyword = mean_keyword_clips(labels, names)
    target = counts.clone()
    for i, name in enumerate(names):
        if name == UNKNOWN:
            target[i] = mean_keyword * config.unknown_ratio
        elif name == SILENCE:
            target[i] = mean_keyword * config.silence_ratio
    per_class = torch.where(counts > 0, target / counts.clamp_min(1), torch.zeros_like(counts))
    return per_class[labels]


class NegativeSpeech:
    """Long recordings with no keyword in them; `windows` cuts clip-length windows at random offsets.

    A window lies wholly inside its recording, or, for a recording shorter than a window, holds all
    of it at a random place with silence around it. Recordings are drawn in proportion to their length.
    """

    def __init__(self, recordings: list[torch.Tensor], window: int) -> None:
        self.recordings = recordings
        self.window = window
        lengths = torch.tensor([max(len(recording), window) for recording in recordings], dtype=torch.float64)
        self.weights = lengths / lengths.sum()

    @classmethod
    def load(cls, files: list[Path], sample_rate: int, window: int, workers: int | None = None) -> NegativeSpeech:
        """Read every file; a file that cannot be read is a data error naming it."""
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            waveforms = list(pool.map(lambda path: torch.from_numpy(load_audio(path, sample_rate)), files))
        return cls([waveform for waveform in waveforms if len(waveform)], window)

    @property
    def samples(self) -> int:
        return sum(len(recording) for recording in self.recordings)

    def windows(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, window) waveforms."""
        return self.stretches(count, 1, 0, generator)[:, 0]

    def stretches(self, count: int, candidates: int, hop: int, generator: torch.Generator) -> torch.Tensor:
        """(count, candidates, window): for each draw, `candidates` windows `hop` samples apart along one
        stretch of one recording (closer together where the recording is too short for the stretch; all
        the same where it is shorter than a window)."""
        chosen = torch.multinomial(self.weights, count, replacement=True, generator=generator)
        offsets = torch.rand(count, generator=generator, dtype=torch.float64)
        result = torch.zeros(count, candidates, self.window)
        for row, (index, offset) in enumerate(zip(chosen.tolist(), offsets.tolist())):
            recording = self.recordings[index]
            spare = len(recording) - self.window
            if spare < 0:
                start = round(offset * -spare)
                result[row, :, start : start + len(recording)] = recording
                continue
            reach = min(spare, (candidates - 1) * hop)
            first = round(offset * (spare - reach))
            for column, step in enumerate(torch.linspace(0, reach, candidates).round().long().tolist()):
                result[row, column] = recording[first + step : first + step + self.window]
        return result


@dataclass(frozen=True)
class HardestWindows:
    """Max-pooling over time for speech with no keyword in it (Hey Snips; Sun et al. 2016): of
    `candidates` windows `hop` samples apart along a stretch of a recording, train on the one the model
    now finds most keyword-like, the window a streaming detector would fire on."""

    model: nn.Module
    keywords: tuple[int, ...]  # the class ids a detection can be
    candidates: int
    hop: int
    device: torch.device

    def windows(self, speech: NegativeSpeech, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, window) waveforms."""
        stretches = speech.stretches(count, self.candidates, self.hop, generator)
        chosen = stretches[:, 0].clone()
        varied = torch.nonzero((stretches[:, 0] != stretches[:, -1]).any(1)).flatten()  # not short clips
        if len(varied):
            flat = stretches[varied].flatten(0, 1)
            training = self.model.training
            self.model.eval()
            with torch.no_grad():
                scores = self.model(flat.to(self.device)).softmax(1)[:, list(self.keywords)].amax(1)
            self.model.train(training)
            best = scores.view(len(varied), self.candidates).argmax(1).cpu()
            chosen[varied] = stretches[varied, best]
        return chosen


def epoch_order(weights: torch.Tensor, clips: int, negative_windows: int, generator: torch.Generator) -> torch.Tensor:
    """The clips of one epoch, drawn by weight, with `negative_windows` places (-1) for negative speech
    shuffled among them."""
    order = torch.multinomial(weights, clips, replacement=True, generator=generator)
    if not negative_windows:
        return order
    order = torch.cat([order, torch.full((negative_windows,), -1, dtype=order.dtype)])
    return order[torch.randperm(len(order), generator=generator)]


def draw_batch(
    split: SplitData,
    indices: torch.Tensor,
    speech: NegativeSpeech | None,
    unknown: int,
    generator: torch.Generator,
    hardest: HardestWindows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(waveforms, labels) of a batch: clips of the split, and negative-speech windows where an index is -1
    (random ones, or the `hardest`)."""
    from_speech = indices < 0
    waveforms = split.waveforms.read(indices.clamp_min(0))
    labels = split.labels[indices.clamp_min(0)].clone()
    if speech is not None and bool(from_speech.any()):
        count = int(from_speech.sum())
        cut = hardest.windows(speech, count, generator) if hardest else speech.windows(count, generator)
        waveforms[from_speech] = cut
        labels[from_speech] = unknown
    return waveforms, labels


class Augmenter:
    """Batched waveform augmentation (shift, gain, speed, noise) and SpecAugment masks."""

    def __init__(self, config: AugmentConfig, noise: list[torch.Tensor], sample_rate: int, generator: torch.Generator):
        self.config = config
        self.noise = noise
        self.sample_rate = sample_rate
        self.generator = generator

    def _uniform(self, size: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(size, generator=self.generator)

    def waveforms(self, batch: torch.Tensor) -> torch.Tensor:
        config, (size, length) = self.config, batch.shape
        if config.speed_range[0] != 1.0 or config.speed_range[1] != 1.0:
            speeds = self._uniform(size, *config.speed_range)
            batch = torch.stack([_change_speed(clip, float(speed), length) for clip, speed in zip(batch, speeds)])
        shift_max = round(config.time_shift_ms * self.sample_rate / 1000)
        if shift_max > 0:
            shifts = torch.randint(-shift_max, shift_max + 1, (size,), generator=self.generator)
            positions = torch.arange(length)[None, :] - shifts[:, None]
            valid = (positions >= 0) & (positions < length)
            batch = torch.where(valid, batch.gather(1, positions.clamp(0, length - 1)), torch.zeros(()))
        if config.reverb_probability > 0:  # no draws otherwise: runs without reverberation stay as they were
            batch = self.reverberate(batch)
        gains_db = self._uniform(size, *config.gain_db_range)
        batch = batch * (10 ** (gains_db / 20))[:, None]
        if self.noise and config.noise_probability > 0:
            mixed = torch.rand(size, generator=self.generator) < config.noise_probability
            levels = 10 ** (self._uniform(size, *config.noise_db_range) / 20)
            for index in torch.nonzero(mixed).flatten().tolist():
                crop = self._noise_crop(length)
                rms = crop.square().mean().sqrt()
                if rms > 0:
                    batch[index] += crop * (levels[index] / rms)
        return batch

    def reverberate(self, batch: torch.Tensor) -> torch.Tensor:
        """Each clip, with `reverb_probability`, heard in a room: convolved with `room_response`. (batch, time)."""
        chosen = torch.rand(len(batch), generator=self.generator) < self.config.reverb_probability
        rt60s = self._uniform(len(batch), *self.config.reverb_rt60_s_range)
        batch = batch.clone()
        for index in torch.nonzero(chosen).flatten().tolist():
            response = room_response(float(rt60s[index]), self.sample_rate, self.generator)
            batch[index] = fft_convolve(batch[index], response)[: batch.shape[1]]
        return batch

    def _noise_crop(self, length: int) -> torch.Tensor:
        source = self.noise[int(torch.randint(len(self.noise), (1,), generator=self.generator))]
        start = int(torch.randint(max(len(source) - length, 1), (1,), generator=self.generator))
        crop = source[start : start + length]
        return nn.functional.pad(crop, (0, length - len(crop)))

    def spectrogram(self, features: torch.Tensor) -> torch.Tensor:
        """SpecAugment: zero (to each clip's mean) random bands and frame ranges. (batch, F, T)."""
        config = self.config
        features = features.clone()
        size, bands, frames = features.shape
        fill = features.mean(dim=(1, 2))
        for axis, count, width in (
            (1, config.freq_masks, config.freq_mask_bands),
            (2, config.time_masks, config.time_mask_frames),
        ):
            extent = bands if axis == 1 else frames
            for _ in range(count):
                widths = torch.randint(0, width + 1, (size,), generator=self.generator)
                starts = (torch.rand(size, generator=self.generator) * (extent - widths + 1)).long()
                positions = torch.arange(extent)[None, :]
                mask = (positions >= starts[:, None]) & (positions < (starts + widths)[:, None])
                mask = mask[:, :, None] if axis == 1 else mask[:, None, :]
                features = torch.where(mask.to(features.device), fill[:, None, None], features)
        return features


def room_response(rt60_s: float, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """A synthetic room impulse response: the direct sound (1 at t = 0), then Gaussian noise decaying by
    60 dB in `rt60_s`, scaled so the reverberant energy equals the direct sound's. (rt60_s * rate,)."""
    length = max(2, round(rt60_s * sample_rate))
    time_s = torch.arange(length) / sample_rate
    tail = torch.randn(length, generator=generator) * torch.exp(-3 * math.log(10) * time_s / rt60_s)
    tail[0] = 0.0
    return torch.cat([torch.ones(1), (tail / tail.square().sum().sqrt())[1:]])


def fft_convolve(signal: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Full linear convolution of two 1D tensors by FFT: (len(signal) + len(response) - 1,)."""
    size = len(signal) + len(response) - 1
    n_fft = 1 << (size - 1).bit_length()
    product = torch.fft.rfft(signal, n_fft) * torch.fft.rfft(response, n_fft)
    return torch.fft.irfft(product, n_fft)[:size]


def _change_speed(clip: torch.Tensor, speed: float, length: int) -> torch.Tensor:
    """Play `clip` `speed` times faster (linear interpolation), keeping `length` samples centred."""
    new_length = max(2, round(len(clip) / speed))
    resampled = nn.functional.interpolate(clip[None, None], size=new_length, mode="linear", align_corners=False)[0, 0]
    if new_length >= length:
        start = (new_length - length) // 2
        return resampled[start : start + length]
    before = (length - new_length) // 2
    return nn.functional.pad(resampled, (before, length - new_length - before))


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then a cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_noise(dataset: Dataset, sample_rate: int) -> list[torch.Tensor]:
    """The training part of each background-noise recording (see data.NOISE_SPLIT_SPANS)."""
    first, last = NOISE_SPLIT_SPANS["training"]
    noise = []
    for path in dataset.noise_files:
        waveform = load_audio(path, sample_rate)
        noise.append(torch.from_numpy(waveform[round(first * len(waveform)) : round(last * len(waveform))].copy()))
    return noise


def initialise_from(model: nn.Module, init_path: str | os.PathLike, labels: tuple[str, ...]) -> list[str]:
    """Copy every weight of a trained model of the same network; the head is kept only when the labels are the
    same. Returns the names of the weights left as initialised (the head's, or none).

    Raises `ConfigError` when any other layer is missing or of another shape: that would silently be training
    from scratch (e.g. `--init` a `resnet_small` into a `resnet_wide` recipe)."""
    source, info = load_model(init_path)
    require_layers(source, "--init")
    source_state = source.state_dict()
    target_state = model.state_dict()
    same_labels = tuple(info.labels) == tuple(labels)
    skipped, mismatched = [], []
    for name, tensor in target_state.items():
        if name.startswith("head.") and not same_labels:
            skipped.append(name)
        elif name in source_state and source_state[name].shape == tensor.shape:
            target_state[name] = source_state[name]
        else:
            shape = tuple(source_state[name].shape) if name in source_state else "missing"
            mismatched.append(f"{name} {tuple(tensor.shape)} here, {shape} there")
    if mismatched:
        preset = info.recipe.get("model", {}).get("name") or info.architecture
        raise ConfigError(
            f"--init {init_path}: a {preset} whose layers do not fit the recipe's model ({len(mismatched)} differ, "
            f"first {mismatched[0]}); start from a model of the same model.name, or set model.name to {preset}"
        )
    model.load_state_dict(target_state)
    return skipped


def check_init_fits(recipe: Recipe, init: str | os.PathLike) -> None:
    """Raise `ConfigError` now, before any data is read, when `init` is not a model of the recipe's network."""
    architecture, arguments = recipe.model.architecture()
    initialise_from(build_model(architecture, arguments, 2, recipe.features), init, ())


def load_teachers(config: DistillConfig, labels: tuple[str, ...], features, device: torch.device) -> list[nn.Module]:
    """The distillation teachers, in eval mode; each must have the recipe's labels and clip format."""
    teachers = []
    for name in config.teachers:
        teacher, info = load_model(name, device)
        if tuple(info.labels) != tuple(labels):
            raise ConfigError(
                f"train.distill.teachers: {name} has the labels {', '.join(info.labels)}; "
                f"the recipe's are {', '.join(labels)}"
            )
        if (info.features.sample_rate, info.features.clip_s) != (features.sample_rate, features.clip_s):
            raise ConfigError(
                f"train.distill.teachers: {name} hears {info.features.clip_s} s at {info.features.sample_rate} Hz; "
                f"the recipe {features.clip_s} s at {features.sample_rate} Hz"
            )
        teachers.append(teacher)
    return teachers


def teacher_probabilities(teachers: list[nn.Module], waveforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teachers' mean probabilities at `temperature` for a batch of waveforms."""
    with torch.no_grad():
        return torch.stack([torch.softmax(teacher(waveforms).float() / temperature, 1) for teacher in teachers]).mean(0)


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL divergence from the teachers' softened probabilities to the student's, scaled by T^2 so its
    gradients keep their size whatever the temperature (Hinton et al. 2015). With `mask`, only the
    clips it marks count (averaged over the whole batch, so the teachers' share stays the same per clip)."""
    log_student = torch.log_softmax(logits.float() / temperature, 1)
    per_clip = nn.functional.kl_div(log_student, targets, reduction="none").sum(1)
    if mask is not None:
        per_clip = per_clip * mask
    return per_clip.mean() * temperature**2


def mixup(features: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Blend each clip's features with another clip's of the batch: (blended, partner indices, share).

    The share of the clip itself is the larger of Beta(alpha, alpha) and its complement, so its own
    label stays the main one; the loss weighs the two labels by share and 1 - share.
    """
    # Beta(alpha, alpha) by its inverse CDF at a uniform draw of `generator`, so runs repeat and resume.
    draw = float(scipy.special.betaincinv(alpha, alpha, float(torch.rand((), generator=generator))))
    share = max(draw, 1 - draw)
    partners = torch.randperm(len(features), generator=generator).to(features.device)
    return share * features + (1 - share) * features[partners], partners, share


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def recipe_sha256(recipe: dict) -> str:
    """A hash of a recipe's settings, for telling whether a run is resumed with the recipe it began with."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# Settings that change how fast a run goes, not what it computes: a resumed run may change them.
_RESUMABLE_CHANGES = ("train.threads",)


def _comparable(recipe: dict) -> dict:
    flat = _flatten(json.loads(json.dumps(recipe)))
    return {key: value for key, value in flat.items() if key not in _RESUMABLE_CHANGES}


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(before: dict, after: dict) -> list[str]:
    """`key: old -> new` for every setting that differs (speed-only settings such as train.threads aside)."""
    old, new = _comparable(before), _comparable(after)
    return [f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]  # fmt: skip


@dataclass
class RunState:
    """What resuming a run needs, written as one file after every epoch (`state.safetensors`).

    The file is also a checkpoint of the last epoch's model (`kws evaluate RUN/state.safetensors`). It
    holds the best epoch's weights too, so `best.safetensors` can always be rewritten from it: a run
    killed at any moment resumes from one consistent epoch.
    """

    epoch: int
    best: dict  # {"epoch", "validation_accuracy"}
    best_weights: dict[str, torch.Tensor]
    history: list[EpochRecord]
    recipe: dict


def save_run_state(path: Path, model: nn.Module, info: ModelInfo, state: RunState, optimizer, scheduler,
                   rng: dict[str, torch.Tensor], processes: int = 1) -> None:  # fmt: skip
    """Write the run state atomically: a crash leaves the previous epoch's file whole. `rng`: the states of
    the random generators (`random_states`), of every process when `processes` train together."""
    tensors, groups = _flatten_optimizer(optimizer)
    tensors.update({f"best.{name}": tensor for name, tensor in state.best_weights.items()})
    tensors.update({f"rng.{name}": tensor for name, tensor in rng.items()})
    values = {
        "epoch": state.epoch, "best": state.best, "history": [asdict(record) for record in state.history],
        "param_groups": groups, "scheduler": scheduler.state_dict(),
        "recipe": state.recipe, "recipe_sha256": recipe_sha256(state.recipe), "processes": processes,
    }  # fmt: skip
    save_checkpoint(path, model, info, extra=tensors, metadata={"kws_state": json.dumps(values)})


def resume_run_state(path: Path, model: nn.Module, optimizer, scheduler, recipe: dict,
                     processes: int = 1) -> tuple[RunState, dict[str, torch.Tensor]]:  # fmt: skip
    """Load the state `save_run_state` wrote into the training objects; refuse a changed recipe or number
    of processes. Returns the state and the random generators' states (for `restore_random_states`)."""
    if not path.is_file():
        raise KWSError(f"{path.parent}: nothing to resume (no {path.name})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            values = json.loads((handle.metadata() or {})["kws_state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise KWSError(f"{path}: not a readable run state ({error}); train into a new --out") from None
    if values.get("recipe_sha256") != recipe_sha256(values.get("recipe", {})) or "scheduler" not in values:
        raise KWSError(f"{path}: a run state from another version of kws; train into a new --out")
    changes = recipe_changes(values["recipe"], recipe)
    if changes:
        raise ConfigError(
            f"{path.parent}: the recipe differs from the one this run began with ({'; '.join(changes[:4])}"
            f"{f'; and {len(changes) - 4} more' if len(changes) > 4 else ''}); resume with the same settings, "
            "or train into a new --out"
        )
    if values.get("processes", 1) != processes:
        raise ConfigError(f"{path.parent}: the run began on {values.get('processes', 1)} process(es), not "
                          f"{processes}; resume it on as many")  # fmt: skip
    extra = {key[len("extra.") :]: tensor for key, tensor in tensors.items() if key.startswith("extra.")}
    model.load_state_dict({key[len("model.") :]: tensor for key, tensor in tensors.items() if key.startswith("model.")})
    _restore_optimizer(optimizer, extra, values["param_groups"])
    scheduler.load_state_dict(values["scheduler"])
    rng = {key[len("rng.") :]: tensor for key, tensor in extra.items() if key.startswith("rng.")}
    best_weights = {key[len("best.") :]: tensor for key, tensor in extra.items() if key.startswith("best.")}
    history = [EpochRecord(**record) for record in values["history"]]
    return RunState(values["epoch"], values["best"], best_weights, history, values["recipe"]), rng


def random_states(generator: torch.Generator, order: torch.Generator, processes: Processes) -> dict[str, torch.Tensor]:
    """Every random generator's state, of every process: what the next epoch draws depends on nothing else.
    One process: its generator (which also orders the epochs), torch's and CUDA's. Several: each one's
    generator and torch's, by rank, and the generator that orders the epochs (the same everywhere)."""
    if processes.world == 1:
        states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states.update({f"cuda.{index}": rng for index, rng in enumerate(torch.cuda.get_rng_state_all())})
        return states
    states = {"order": order.get_state()}
    for name, state in (("generator", generator.get_state()), ("torch", torch.get_rng_state())):
        states.update({f"{name}.{rank}": value for rank, value in enumerate(processes.gather(state))})
    return states


def restore_random_states(rng: dict[str, torch.Tensor], generator: torch.Generator, order: torch.Generator,
                          processes: Processes) -> None:  # fmt: skip
    """Set the generators to the states `random_states` took."""
    if processes.world == 1:
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        cuda_states = [rng[f"cuda.{index}"] for index in range(torch.cuda.device_count()) if f"cuda.{index}" in rng]
        if cuda_states and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        return
    order.set_state(rng["order"])
    generator.set_state(rng[f"generator.{processes.rank}"])
    torch.set_rng_state(rng[f"torch.{processes.rank}"])


def train(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    device: str = "auto",
    resume: bool = False,
    init: str | None = None,
    cache_root: str | os.PathLike = "features",
    command: str | None = None,
    on_start: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, float, float], None] | None = None,
    on_epoch: Callable[[EpochRecord, bool], None] | None = None,
    processes: Processes = ONE_PROCESS,
) -> TrainResult:
    """Train the recipe's model; `on_batch(clips, loss, accuracy)` and `on_epoch(record, is_best)` report.

    `command` (how the run was started) goes into the model card with the seed and the time it took.
    With several `processes` (torchrun), each trains on its slice of every batch and rank 0 writes the files.
    """
    config = recipe.train
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    # One generator orders the epochs (the same in every process); each process augments with its own.
    generator = torch.Generator().manual_seed(config.seed + 7919 * processes.rank)
    order_generator = generator if processes.world == 1 else torch.Generator().manual_seed(config.seed)

    if not processes.main:
        processes.wait()  # rank 0 extracts the feature cache first
    if init:
        check_init_fits(recipe, init)  # before minutes of extraction
    dataset, data, skipped = load_training_data(recipe, Path(cache_root))
    if processes.main:
        processes.wait()
    labels = dataset.labels
    train_split, validation_split = data["training"], data["validation"]
    if len(train_split.labels) == 0:
        raise KWSError("the dataset has no clips in the training split")
    # Without a validation split (e.g. every speaker but the test one trains), the last epoch is kept.
    has_validation = len(validation_split.labels) > 0
    architecture, arguments = recipe.model.architecture()
    model = build_model(architecture, arguments, len(labels), recipe.features)
    reinitialised = initialise_from(model, init, labels) if init else []
    model.to(torch_device)
    if processes.world > 1:
        torch.manual_seed(config.seed + 7919 * processes.rank)  # dropout masks of their own
    distill = config.distill
    teachers = load_teachers(distill, labels, recipe.features, torch_device)
    noise = load_noise(dataset, recipe.features.sample_rate)
    augmenter = Augmenter(config.augment, noise, recipe.features.sample_rate, generator)
    weights = class_sampling_weights(train_split.labels, labels, config)
    clips_per_epoch = int(round(float(weights.sum())))
    speech_files = negative_speech_files(recipe.data, dataset)
    speech = NegativeSpeech.load(speech_files, recipe.features.sample_rate, recipe.features.clip_samples) \
        if speech_files else None  # fmt: skip
    speech_per_epoch = round(mean_keyword_clips(train_split.labels, labels) * config.negative_speech_ratio) \
        if speech else 0  # fmt: skip
    steps_per_epoch = math.ceil((clips_per_epoch + speech_per_epoch) / config.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps)
    )
    unknown_id = labels.index(UNKNOWN) if UNKNOWN in labels else -1
    hardest = HardestWindows(
        model, tuple(index for index, label in enumerate(labels) if is_keyword(label)),
        config.negative_speech_candidates, round(NEGATIVE_SPEECH_HOP_S * recipe.features.sample_rate), torch_device,
    ) if speech and config.negative_speech_candidates > 1 else None  # fmt: skip
    loss_function = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    use_amp = torch_device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state_path = run_dir / RUN_STATE

    def info_with(metrics: dict) -> ModelInfo:
        return ModelInfo(architecture, arguments, recipe.features, labels, recipe.to_dict(), metrics)

    def best_metrics(best: dict) -> dict:
        return {"epoch": best["epoch"], "validation_accuracy": best["validation_accuracy"], "parameters": parameters}

    parameters = count_parameters(model)
    if resume:
        for partial in run_dir.glob(".*.partial-*"):  # what a killed run was writing
            partial.unlink()
        state, rng = resume_run_state(state_path, model, optimizer, scheduler, recipe.to_dict(), processes.world)
        restore_random_states(rng, generator, order_generator, processes)
        # best.safetensors is rewritten from the state: a crash just after the state was written may
        # have left it an epoch behind.
        best_model = copy.deepcopy(model)  # not a new model: building one would draw from the restored RNG
        best_model.load_state_dict(state.best_weights)
        if processes.main:
            save_checkpoint(run_dir / "best.safetensors", best_model, info_with(best_metrics(state.best)))
    elif state_path.exists():
        raise KWSError(f"{run_dir}: holds an earlier run; use --resume to continue it or choose another --out")
    else:
        state = RunState(0, {"epoch": 0, "validation_accuracy": -1.0}, {}, [], recipe.to_dict())
    start_epoch = state.epoch + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    if on_start:
        on_start({
            "labels": labels, "parameters": parameters, "architecture": architecture, "device": str(torch_device),
            "clips_per_epoch": clips_per_epoch + speech_per_epoch, "start_epoch": start_epoch,
            "negative_speech": (len(speech.recordings), speech.samples / recipe.features.sample_rate, speech_per_epoch)
            if speech else None, "reinitialised": reinitialised,
            "skipped": skipped, "warnings": dataset.warnings, "train_clips": len(train_split.labels),
            "validation_clips": len(validation_split.labels),
        })  # fmt: skip

    def evaluate(scored: nn.Module, split: SplitData) -> EvaluationReport:
        return evaluate_waveforms(scored, split.waveforms.batches(256), split.labels, labels, torch_device)

    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = epoch_order(weights, clips_per_epoch, speech_per_epoch, order_generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for batch_indices in order.split(config.batch_size):
            mine = processes.shard(batch_indices)
            share = len(mine) / len(batch_indices)
            if not len(mine):  # a last batch smaller than the processes: take part, with no weight
                mine = batch_indices[:1]
            waveforms, targets = draw_batch(train_split, mine, speech, unknown_id, generator, hardest)
            waveforms = augmenter.waveforms(waveforms)
            targets = targets.to(torch_device)
            waveforms = waveforms.to(torch_device)
            with torch.autocast(torch_device.type, enabled=use_amp):
                # The teachers hear the augmented clip, before SpecAugment's masks and mixup.
                soft = teacher_probabilities(teachers, waveforms, distill.temperature) if teachers else None
                agree = (soft.argmax(1) == targets).float() if teachers and distill.agreeing_only else None
                features = model.front_end(waveforms)
                if architecture == "resnet":
                    features = augmenter.spectrogram(features)
                if config.mixup_alpha:
                    features, partners, share = mixup(features, config.mixup_alpha, generator)
                logits = model.classify(features)
                loss = loss_function(logits.float(), targets)
                if config.mixup_alpha:
                    loss = share * loss + (1 - share) * loss_function(logits.float(), targets[partners])
                    soft = share * soft + (1 - share) * soft[partners] if teachers else None
                    agree = agree * agree[partners] if agree is not None else None
                if teachers:
                    loss = (1 - distill.weight) * loss + distill.weight * distillation_loss(
                        logits, soft, distill.temperature, agree
                    )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            processes.average_gradients(model, share)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            batch_correct = int((logits.argmax(1) == targets).sum())
            loss_sum += float(loss.detach()) * len(targets)
            correct += batch_correct
            seen += len(targets)
            if on_batch:
                on_batch(len(batch_indices), float(loss.detach()), batch_correct / len(targets))
        loss_sum, correct, seen = processes.total(loss_sum, correct, seen)
        processes.average_buffers(model)
        validation = evaluate(model, validation_split) if has_validation else None
        record = EpochRecord(
            epoch, loss_sum / seen, correct / seen, validation.accuracy if validation else None,
            optimizer.param_groups[0]["lr"], time.perf_counter() - started,
        )  # fmt: skip
        state.epoch = epoch
        state.history.append(record)
        is_best = validation is None or record.validation_accuracy > state.best["validation_accuracy"]
        if is_best:
            state.best = {"epoch": epoch, "validation_accuracy": record.validation_accuracy}
            state.best_weights = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        metrics = {"epoch": epoch, "validation_accuracy": record.validation_accuracy, "parameters": parameters}
        rng = random_states(generator, order_generator, processes)
        if processes.main:
            # The state is the one record of the epoch; best.safetensors and the metrics files follow from it.
            save_run_state(state_path, model, info_with(metrics), state, optimizer, scheduler, rng, processes.world)
            if is_best:
                save_checkpoint(run_dir / "best.safetensors", model, info_with(best_metrics(state.best)))
            write_metrics(run_dir, state.history)
        processes.wait()
        if on_epoch:
            on_epoch(record, is_best)

    if not processes.main:
        return TrainResult(run_dir, state.best["epoch"], state.best["validation_accuracy"], state.history, None,
                           parameters)  # fmt: skip
    best_model, best_info = load_model(run_dir / "best.safetensors", torch_device)
    testing = data.get("testing")
    test_report = evaluate(best_model, testing) if testing is not None and len(testing.labels) else None
    final_metrics = {
        **best_info.metrics,
        "best_epoch": state.best["epoch"],
        "test": test_report.to_dict() if test_report else None,
        "validation": evaluate(best_model, validation_split).to_dict() if has_validation else None,
    }
    # A fine-tune's card keeps how its --init (and its teachers) were made in turn, so the whole chain of
    # commands is on record.
    started_from = read_info(init).card.get("training") if init else None
    taught_by = [read_info(teacher).card.get("training", {}) for teacher in distill.teachers]
    training = {
        **({"command": command} if command else {}),
        "seed": config.seed, "epochs": config.epochs, "best_epoch": state.best["epoch"],
        "minutes": round(sum(record.seconds for record in state.history) / 60, 1), "where": where(torch_device),
        **({"processes": processes.world} if processes.world > 1 else {}),
        **({"init": started_from} if started_from else {}),
        **({"teachers": taught_by} if any(taught_by) else {}),
    }  # fmt: skip
    save_checkpoint(
        run_dir / "best.safetensors", best_model, replace(info_with(final_metrics), card={"training": training})
    )
    (run_dir / "report.json").write_text(json.dumps(final_metrics, indent=2) + "\n")
    plot_curves(run_dir, state.history)
    return TrainResult(
        run_dir, state.best["epoch"], state.best["validation_accuracy"], state.history, test_report, parameters
    )


def where(device: torch.device) -> str:
    """The machine a run used, for its model card: the GPU's name, or the CPU threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"


def write_metrics(run_dir: Path, history: list[EpochRecord]) -> None:
    rows = [asdict(record) for record in history]
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")


def plot_curves(run_dir: Path, history: list[EpochRecord]) -> None:
    """Loss and accuracy per epoch, as `curves.png` (skipped when matplotlib is not installed)."""
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record.epoch for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r.train_loss for r in history], label="training loss")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="Training loss")
    accuracy_axis.plot(epochs, [100 * r.train_accuracy for r in history], label="training (augmented)")
    if history and history[0].validation_accuracy is not None:
        accuracy_axis.plot(epochs, [100 * r.validation_accuracy for r in history], label="validation")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    accuracy_axis.legend()
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "curves.png", dpi=100)
    plt.close(figure)
