"""How a model treats words that sound like its keywords: near-miss rejection and keyword recall on synthetic speech.

    python bench/near_misses.py [--model speech_commands] [--out DIR] [--holdout-engine flite]
                                [--engines espeak-ng,flite,festival,piper] [--near-misses 10] [--variants 2]
                                [--seed 0] [--workers 0]

Makes (or, in an existing `--out`, reuses) a synthetic set as `kws synth` does: the model's keywords and
`--near-misses` words that sound like each (from the CMU dictionary; `--skip-near-misses N` takes the
words after the first N, which a training set made with `kws synth --near-misses N` never heard),
each said `--variants` times by
every voice of the held-out engine (default flite, whose voices training sets made with the other
engines never heard), or of each engine in `--engines`. Then classifies every clip and prints, per
engine and keyword, near-miss rejection (the clip's top label is no keyword, i.e. `_unknown_` or
`_silence_`), keyword recall (the top label is the right keyword), and the near misses most often
taken for a keyword. Exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from machine import describe

from kws.checkpoint import load_model
from kws.classify import classify_files
from kws.stream import is_keyword
from kws.synth import available_voices, folder_name, phrase_sets, read_index, write_synthetic_set


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="speech_commands", help="model file, run folder or shipped model name")
    parser.add_argument("--out", type=Path, default=None, help="keep the synthetic set here (default: a temporary one)")
    parser.add_argument("--holdout-engine", default="flite", help="the engine whose voices say the words")
    parser.add_argument("--engines", default=None, help="comma-separated engines instead of --holdout-engine")
    parser.add_argument("--near-misses", type=int, default=10, help="near-miss words per keyword")
    parser.add_argument(
        "--skip-near-misses", type=int, default=0,
        help="leave out each keyword's first N near misses (those a training set took): measures unheard words",
    )  # fmt: skip
    parser.add_argument("--variants", type=int, default=2, help="takes per word and voice (random rate and pitch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="syntheses and file loads in parallel (0: per core)")
    args = parser.parse_args()

    model, info = load_model(args.model, "cpu")
    keywords = [label for label in info.labels if is_keyword(label)]
    engines = [name.strip() for name in args.engines.split(",")] if args.engines else [args.holdout_engine]
    voices = available_voices(engines)
    print(describe("cpu"))
    if not voices:
        print(f"none of {', '.join(engines)} is installed: nothing to measure")
        return
    texts, notes = phrase_sets(keywords, args.skip_near_misses + args.near_misses, args.seed)
    texts = {label: words[args.skip_near_misses :] if label.startswith("_near_") else words
             for label, words in texts.items()}  # fmt: skip
    for note in notes:
        print(f"note: {note}")

    with tempfile.TemporaryDirectory(prefix="kws-near-misses-") as temporary:
        out = args.out or Path(temporary)
        summary = write_synthetic_set(out, texts, voices, args.variants, args.seed, workers=args.workers or None)
        for line in summary.failures:
            print(f"failed: {line}")
        wanted = {(label, text) for label, label_texts in texts.items() for text in label_texts}
        voice_ids = {voice.id for voice in voices}
        rows = [row for row in read_index(out) if (row["label"], row["text"]) in wanted and row["voice"] in voice_ids]
        paths = [out / row["path"] for row in rows]
        started = time.perf_counter()
        results = list(classify_files(model, info, paths, 1, workers=args.workers or os.cpu_count()))
        classify_s = time.perf_counter() - started

    print(
        f"settings: model {args.model} ({info.architecture}, keywords {', '.join(keywords)}); voices "
        f"{', '.join(sorted(voice_ids))}; {args.near_misses} near misses per keyword, {args.variants} takes per word "
        f"and voice, seed {args.seed}; {summary.written} clips synthesized now, {summary.already_there} reused"
    )
    for engine in sorted({voice.engine for voice in voices}):
        written, seconds = summary.engine_written.get(engine, 0), summary.engine_seconds.get(engine, 0.0)
        per_clip = f", {seconds / written:.3f} s per clip" if written else ""
        print(f"synthesis: {engine} wrote {written} clips in {seconds:.1f} thread-seconds{per_clip}")
    print(f"classified {len(results)} clips in {classify_s:.1f} s")

    keyword_of = {label: keyword for keyword in keywords for label in (folder_name(keyword), f"_near_{keyword}")}
    for engine in sorted({row["engine"] for row in rows}):
        print()
        engine_voices = len({row["voice"] for row in rows if row["engine"] == engine})
        print(f"{engine}: {engine_voices} voice{'s' if engine_voices != 1 else ''}")
        print(f"{'keyword':>10}  {'clips':>6}  {'recall %':>8}  {'near-miss clips':>15}  {'rejected %':>10}")
        accepted: Counter = Counter()
        near_totals: Counter = Counter()
        totals = Counter()
        said = [(row, result) for row, result in zip(rows, results) if row["engine"] == engine]
        for keyword in keywords:
            own = [result for row, result in said if row["label"] == folder_name(keyword)]
            near = [(row, result) for row, result in said if row["label"] == f"_near_{keyword}"]
            recalled = sum(result.label == keyword for result in own)
            rejected = sum(result.label is not None and not is_keyword(result.label) for _, result in near)
            for row, result in near:
                near_totals[row["text"]] += 1
                if result.label is not None and is_keyword(result.label):
                    accepted[(row["text"], keyword_of[row["label"]], result.label)] += 1
            totals.update(clips=len(own), recalled=recalled, near=len(near), rejected=rejected)
            print(
                f"{keyword:>10}  {len(own):>6}  {percent(recalled, len(own)):>8}  {len(near):>15}  "
                f"{percent(rejected, len(near)):>10}"
            )
        print(
            f"{'all':>10}  {totals['clips']:>6}  {percent(totals['recalled'], totals['clips']):>8}  "
            f"{totals['near']:>15}  {percent(totals['rejected'], totals['near']):>10}"
        )
        most = [
            f"{text} ({near_of}) as {label} {count}/{near_totals[text]}"
            for (text, near_of, label), count in accepted.most_common(10)
        ]
        print(f"most often accepted: {'; '.join(most) or 'none'}")


if __name__ == "__main__":
    main()
