"""A model for a keyword nobody has recorded, from its text alone (`kws train-word`).

The phrase said by every offline voice (`kws.synth`) at other rates, pitches and intonations; words
that sound like it, said by the same voices, and real speech without it as negatives; the project's
recipe (`recipes/new_word.yaml`) trained by `kws.train` from a model of real speech (`DEFAULT_INIT`),
optionally fine-tuned on mined false accepts (`kws.mine`); a detector calibrated to a target rate of
false accepts per hour (`kws.calibrate`); a card (`kws.card`). Every step writes its output whole into
the run folder and a rerun finds it there, so an interrupted run continues where it stopped. Real
recordings of the phrase itself are never used.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kws.audio import load_audio
from kws.calibrate import LOW_SWEEP_THRESHOLDS, calibrate_model, detector_card, make_streams
from kws.card import measure_card, write_card
from kws.checkpoint import load_model, read_info
from kws.config import DataConfig, expand_path, load_recipe
from kws.data import NOISE_FOLDER, load_dataset
from kws.errors import DataError, KWSError
from kws.mine import find_recordings, mine_recordings
from kws.stream import DetectorConfig
from kws.stream_test import spoken_data_config
from kws.synth import (
    SynthesisError,
    Voice,
    available_voices,
    folder_name,
    near_misses,
    write_audio_atomically,
    write_synthetic_set,
)
from kws.train import check_init_fits, train

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "new_word.yaml"
# Training starts from the shipped model of thousands of real speakers: it hears real voices, which the
# synthetic ones alone do not teach (on the development word, 76.1% -> 82.5% found at <= 1 FA/h).
# resnet_small, 12 keywords and negative speech: on the development word it found 88.0% at <= 1 FA/h against
# 78.3% from the wide speech_commands (bench/RESULTS.md)
DEFAULT_INIT = "speech_commands12"
# Each phrase said plainly, as a question and as an exclamation: three intonations from every engine.
EXPRESSIONS = ("", "?", "!")
# Voices held out of training: the validation voices choose the best epoch and calibrate the detector.
VALIDATION_VOICES = ("espeak-en-gb+f4", "espeak-en-029", "flite-awb")
TESTING_VOICES = ("espeak-en-us-nyc+m5",)
# The shipped models' detector (600 ms smoothing, chosen on validation streams: bench/RESULTS.md).
DETECTOR = DetectorConfig(smoothing_ms=600.0)
MINING_THRESHOLD = 0.2  # mining collects what comes near firing (thresholds go down to 0.05), not only what fires
NEAR_MISS_LABEL = "near_miss"
NEAR_MISS_TAKES = 3  # takes of each near miss per voice
NEURAL_VOICE_TAKES = 4  # piper's voice, the most like a person's, says the phrase this many times as often
# Training clips kept of each other word (Speech Commands holds 800 of some): with many more real words than
# synthetic near misses among the negatives, sounding synthetic would tell a keyword from the rest.
OTHER_WORD_TRAINING_CLIPS = 150
PLAN_FILE = "train_word.json"


@dataclass(frozen=True)
class WordPlan:
    """What `train_word` makes: the phrases, the voices and takes, the negatives and the recipe."""

    phrases: tuple[str, ...]
    negatives: str | None = None  # manifest of speech in which the phrases are not said (path,label,split)
    other_words: str | None = None  # Speech Commands-style folder of other words: all negatives
    engines: tuple[str, ...] | None = None  # None: every engine installed
    variants: int = 8  # takes of each text per voice, each at its own rate and pitch
    near_miss_count: int = 40  # per word of each phrase
    recipe: str = str(DEFAULT_RECIPE)
    overrides: tuple[str, ...] = ()
    false_accepts_per_hour: float = 1.0
    mining_rounds: int = 0
    seed: int = 0
    init: str | None = DEFAULT_INIT  # a trained model to start from (as kws train --init); None: from scratch

    def __post_init__(self) -> None:
        if not self.phrases or any(not phrase.strip() for phrase in self.phrases):
            raise KWSError("an empty phrase: give the words to spot, e.g. kws train-word computer")
        bad = [phrase for phrase in self.phrases if not re.fullmatch(r"[a-z' ]+", phrase.strip().lower())]
        if bad:
            raise KWSError(f"{', '.join(map(repr, bad))}: a phrase is words of letters (a-z) and spaces")
        folders = [folder_name(phrase) for phrase in self.phrases]
        if len(set(folders)) < len(folders):
            raise KWSError(f"the same phrase twice: {', '.join(self.phrases)}")
        if self.variants < 1 or self.near_miss_count < 0 or self.mining_rounds < 0:
            raise KWSError("variants must be at least 1; near misses and mining rounds at least 0")
        if not self.false_accepts_per_hour > 0:
            raise KWSError(f"false accepts per hour: must be positive (got {self.false_accepts_per_hour})")

    @property
    def words(self) -> tuple[str, ...]:
        """The model's keywords: the phrases as labels (`lights on` -> `lights_on`)."""
        return tuple(folder_name(phrase) for phrase in self.phrases)


@dataclass
class WordResult:
    """What `train_word` made: the model, its validation figures, what it left out, and how long it took."""

    model: Path
    thresholds: dict[str, float]
    validation: dict  # the calibrated detector on the validation streams (calibrate.OperatingPoint.to_dict)
    excluded: dict[str, int]  # recordings of a phrase left out, by source
    clips: dict[str, int]  # training manifest rows by label
    minutes: dict[str, float] = field(default_factory=dict)  # per step, and "total"


def says_phrase(label: str, text: str, phrases: Sequence[str]) -> bool:
    """Whether a recording labelled `label` with transcript `text` holds one of the phrases."""
    spoken = " ".join(re.findall(r"[a-z']+", text.lower()))
    return any(
        label == folder_name(phrase) or re.search(rf"\b{re.escape(' '.join(phrase.lower().split()))}\b", spoken)
        for phrase in phrases
    )


def write_negatives_without(source: str | os.PathLike, out: Path, phrases: Sequence[str]) -> int:
    """Copy manifest `source` to `out` (paths made absolute), leaving out every row that says a phrase
    (its label is the phrase, or its transcript holds it). Returns the rows left out."""
    source = expand_path(source)
    if not source.is_file():
        raise DataError(f"{source}: no such negatives manifest")
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows, fields = list(reader), list(reader.fieldnames or [])
    if "path" not in fields or "label" not in fields:
        raise DataError(f"{source}: a negatives manifest needs path and label columns")
    kept = [row for row in rows if not says_phrase(row["label"], row.get("text") or "", phrases)]
    for row in kept:
        path = expand_path(row["path"])
        row["path"] = str(path if path.is_absolute() else (source.parent / path).resolve())
    _write_csv(out, fields, kept)
    return len(rows) - len(kept)


def voice_splits(voices: Sequence[Voice]) -> dict[str, str]:
    """Voice id -> split: the validation and testing voices that are installed, the rest train; with none
    of those, the last voice validates (when there are two or more)."""
    ids = [voice.id for voice in voices]
    splits = {id_: "training" for id_ in ids}
    splits.update({id_: "validation" for id_ in ids if id_ in VALIDATION_VOICES})
    if "validation" not in splits.values() and len(ids) > 1:
        splits[ids[-1]] = "validation"
    training = [id_ for id_ in ids if splits[id_] == "training"]
    splits.update({id_: "testing" for id_ in training if id_ in TESTING_VOICES and len(training) > 1})
    return splits


def near_miss_texts(phrases: Sequence[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """Words that sound like each word of the phrases (and, of a phrase of several words, each word alone),
    none a phrase itself nor a one-word phrase's homophone; and notes on words that got none."""
    texts, notes = [], []
    said = {" ".join(phrase.lower().split()) for phrase in phrases}
    single_words = [text for text in said if " " not in text]
    for phrase in phrases:
        words = phrase.lower().split()
        texts += words if len(words) > 1 else []
        for word in words:
            try:
                texts += near_misses(word, count, seed, unstressed_variants=False, avoid=single_words)
            except SynthesisError as error:
                notes.append(str(error))
    return [text for text in dict.fromkeys(texts) if text not in said], notes


def train_word(
    plan: WordPlan, out: str | os.PathLike, device: str = "auto", workers: int | None = None,
    on_step: Callable[[str], None] | None = None, on_epoch: Callable | None = None, command: str | None = None,
) -> WordResult:  # fmt: skip
    """Make `out/best.safetensors`, a calibrated model of the plan's phrases, from text alone; see the module.

    `command` (how it was started) goes into the model card."""
    step = on_step or (lambda text: None)
    out = Path(out).resolve()
    if plan.init:  # a missing model, or one of another network, is named now, not after the synthesis
        check_init_fits(load_recipe(plan.recipe, list(plan.overrides)), plan.init)
    _check_plan(out, plan)
    minutes: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        minutes[name] = round((time.perf_counter() - clock) / 60, 2)
        clock = time.perf_counter()

    voices = available_voices(plan.engines)
    if not voices:
        raise SynthesisError(f"none of the engines {', '.join(plan.engines or ())} is installed")
    step(f"synthesizing {', '.join(plan.phrases)} and near misses with {len(voices)} voices")
    synth_dir = out / "synth"
    positives = {word: [f"{phrase}{mark}" for mark in EXPRESSIONS] for word, phrase in zip(plan.words, plan.phrases)}
    texts, notes = near_miss_texts(plan.phrases, plan.near_miss_count, plan.seed)
    for note in notes:
        step(f"note: {note}")
    sets = [
        write_synthetic_set(synth_dir, positives, chosen, plan.variants * takes, plan.seed, workers=workers)
        for chosen, takes in (([v for v in voices if v.engine != "piper"], 1),
                              ([v for v in voices if v.engine == "piper"], NEURAL_VOICE_TAKES)) if chosen
    ]  # fmt: skip
    if texts:
        sets.append(write_synthetic_set(synth_dir, {NEAR_MISS_LABEL: texts}, voices, NEAR_MISS_TAKES, plan.seed,
                                        workers=workers))  # fmt: skip
    failures = [line for made in sets for line in made.failures]
    clips = [clip for made in sets for clip in made.clips]
    if not any(clip.label in plan.words for clip in clips):
        raise SynthesisError(f"no voice said the phrase: {failures[0] if failures else 'no clips'}")
    lap("synthesize")

    step("writing the training manifest (real recordings of the phrase left out)")
    data_dir = out / "data"
    excluded = {}
    negatives = None
    if plan.negatives:
        negatives = data_dir / "negatives.csv"
        excluded["negatives"] = write_negatives_without(plan.negatives, negatives, plan.phrases)
    splits = voice_splits(voices)
    rows = _synthetic_rows(clips, synth_dir, data_dir / "clips", splits, workers)
    noise_dir = None
    if plan.other_words:
        words_rows, excluded["other_words"], noise_dir = _other_word_rows(plan.other_words, plan.words)
        rows += words_rows
    manifest = data_dir / "manifest.csv"
    _write_csv(manifest, ["path", "label", "split", "speaker"], rows)
    lap("manifest")

    recipe = load_recipe(plan.recipe, [
        f"data.path={manifest}", "data.layout=manifest", f"data.words=[{', '.join(plan.words)}]",
        *([f"data.noise_dir={noise_dir}"] if noise_dir else []),
        *([f"data.negative_speech=[{negatives}]"] if negatives else []),
        f"train.seed={plan.seed}", *plan.overrides,
    ])  # fmt: skip
    step(f"training {recipe.model.name} for {recipe.train.epochs} epochs")
    run = out / "train"
    command = command or f"kws train-word {' '.join(plan.phrases)} --out {out}"
    _train_once(recipe, run, device, out / "features", on_epoch, command, plan.init)
    lap("train")

    for round_number in range(1, plan.mining_rounds + 1):
        step(f"mining round {round_number}: false accepts of {run} on the negatives' training split")
        mined = out / f"mined_{round_number}"
        model, info = load_model(run)
        recordings = find_recordings([negatives], "training") if negatives else []
        mine_recordings(model, info.labels, info.features, recordings, mined,
                        replace(DETECTOR, threshold=MINING_THRESHOLD), model_name=str(run.resolve()))  # fmt: skip
        tuned = load_recipe(plan.recipe, [*_overrides_of(recipe, mined), *plan.overrides])
        previous, run = run, out / f"train_mined_{round_number}"
        _train_once(tuned, run, device, out / "features", on_epoch, command, str(previous / "best.safetensors"))
        lap(f"mining_round_{round_number}")

    model_path = out / "best.safetensors"
    _copy_atomically(run / "best.safetensors", model_path)
    step(f"calibrating the detector to {plan.false_accepts_per_hour:g} false accept(s) an hour (validation)")
    info = read_info(model_path)
    streams = out / "streams"
    validation = {}
    thresholds = {}
    if negatives:
        # Calibrated on real speech without the phrase (the negatives, other words): the near misses train the
        # model, but a stream dense with them is no hour of anyone's speech.
        calibration = data_dir / "calibration.csv"
        _write_csv(calibration, ["path", "label", "split", "speaker"],
                   [row for row in rows if row["label"] != NEAR_MISS_LABEL])  # fmt: skip
        keyword_path, negative_path = make_streams(calibration, negatives, streams, "validation",
                                                   info.features.sample_rate, workers=workers,
                                                   config=recipe.data)  # fmt: skip
        model, info = load_model(model_path)
        config, point = calibrate_model(model, info, keyword_path, negative_path, plan.false_accepts_per_hour, DETECTOR,
                                        LOW_SWEEP_THRESHOLDS)  # fmt: skip
        names = {"split": "validation", "data": str(calibration), "negatives": str(negatives), "repeats": 4}
        write_card(model_path, {**info.card, "detector": detector_card(config, plan.false_accepts_per_hour, point,
                                                                        names)})  # fmt: skip
        thresholds, validation = dict(config.keyword_thresholds), point.to_dict()
    lap("calibrate")
    step("measuring the card on the testing split")
    card = measure_card(model_path, manifest, workers=workers, on_step=step)
    card["training"] = {**card["training"], "train_word": _command_summary(plan, excluded)}
    write_card(model_path, card)
    lap("card")
    minutes["total"] = round((time.perf_counter() - started) / 60, 2)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    result = WordResult(model_path, thresholds, validation, excluded, counts, minutes)
    _write_json(out / "result.json", {**asdict(result), "model": str(model_path), "failures": failures})
    return result


def _check_plan(out: Path, plan: WordPlan) -> None:
    """A run folder holds one plan: a rerun with the same continues, one with another is refused."""
    path = out / PLAN_FILE
    values = json.loads(json.dumps(asdict(plan)))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != values:
            changed = ", ".join(key for key in values if stored.get(key) != values[key])
            raise KWSError(f"{out}: made before with another {changed} ({path}); use another --out, or the same "
                           "settings to continue")  # fmt: skip
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, values)


def _synthetic_rows(clips, synth_dir: Path, clips_dir: Path, splits: dict[str, str], workers: int | None) -> list:
    """Manifest rows of the synthetic clips, each stored Ogg Vorbis coded, as the real recordings kws
    tests on are (a codec heard only in negatives would be a cue to no keyword)."""

    def coded(clip) -> dict[str, str]:
        path = clips_dir / clip.path.relative_to(synth_dir).with_suffix(".ogg")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_audio_atomically(path, load_audio(clip.path, 16000), 16000, format="OGG", subtype="VORBIS")
        return {"path": str(path.resolve()), "label": clip.label, "split": splits[clip.voice.id],
                "speaker": clip.voice.id}  # fmt: skip

    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        return list(pool.map(coded, clips))


def _other_word_rows(folder: str, words: Sequence[str]) -> tuple[list[dict], int, Path | None]:
    """Rows of every clip of a Speech Commands-style folder, in its own splits, except folders named as
    a keyword; how many were left out; its background-noise folder."""
    root = expand_path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of other words")
    dataset = load_dataset(spoken_data_config(DataConfig(layout="speech_commands"), root), root)
    kept = [clip for clip in dataset.clips if clip.label not in words]
    taken: dict[str, int] = {}
    rows = []
    for clip in sorted(kept, key=lambda clip: hashlib.sha1(str(clip.path).encode()).hexdigest()):
        if clip.split == "training":
            taken[clip.label] = taken.get(clip.label, 0) + 1
            if taken[clip.label] > OTHER_WORD_TRAINING_CLIPS:
                continue
        rows.append({"path": str(clip.path.resolve()), "label": clip.label, "split": clip.split,
                     "speaker": clip.speaker})  # fmt: skip
    noise = root / NOISE_FOLDER
    return rows, len(dataset.clips) - len(kept), noise if noise.is_dir() else None


def _train_once(recipe, run: Path, device: str, cache: Path, on_epoch, command: str, init: str | None = None) -> None:
    """Train into `run` unless it finished before; a run cut short resumes from its last epoch."""
    if (run / "report.json").is_file():
        return
    resume = (run / "state.safetensors").is_file()
    train(recipe, run, device=device, resume=resume, init=None if resume else init, cache_root=cache,
          command=command, on_epoch=on_epoch)  # fmt: skip


def _overrides_of(recipe, mined: Path) -> list[str]:
    """The recipe's data settings, the mined windows added as _unknown_, and a short fine-tuning."""
    data = recipe.data
    return [
        f"data.path={data.path}", "data.layout=manifest", f"data.words=[{', '.join(data.words)}]",
        *([f"data.noise_dir={data.noise_dir}"] if data.noise_dir else []),
        *([f"data.negative_speech=[{', '.join(data.negative_speech)}]"] if data.negative_speech else []),
        f"data.extra_unknown=[{mined}]", f"train.seed={recipe.train.seed}",
        f"train.epochs={max(1, recipe.train.epochs // 3)}", f"train.learning_rate={recipe.train.learning_rate / 3}",
        "train.warmup_epochs=0.5",
    ]  # fmt: skip


def _command_summary(plan: WordPlan, excluded: dict[str, int]) -> dict:
    return {"plan": json.loads(json.dumps(asdict(plan))), "excluded_recordings_of_the_phrase": excluded}


@contextlib.contextmanager
def _written_atomically(path: Path) -> Iterator[Path]:
    """A partial file to write `path` through: moved into place when the block ends, removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with _written_atomically(path) as partial, partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, values: dict) -> None:
    with _written_atomically(path) as partial:
        partial.write_text(json.dumps(values, indent=1, default=str) + "\n")


def _copy_atomically(source: Path, target: Path) -> None:
    with _written_atomically(target) as partial:
        shutil.copyfile(source, partial)
