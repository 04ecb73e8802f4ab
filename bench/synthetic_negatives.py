"""Synthetic negatives: common English words and near-misses of the keywords, spoken by espeak-ng.

    python bench/synthetic_negatives.py OUT_DIR [--takes 4] [--seed 0]
    kws train recipes/speech_commands.yaml --set "data.extra_unknown=[OUT_DIR]" --set train.unknown_ratio=2.0

Each word is spoken `--takes` times, each time by a random English voice and variant of espeak-ng at a
random speed and pitch (22.05 kHz WAV files, WORD_TAKE.wav). Speech Commands' own 35 words and the
keywords' homophones ("know", "write") are left out as words, but three compounds still say one
("know-how", "write-up", "go-kart": 12 of the clips). With 374
words and 4 takes it writes 1,496 clips, about as many as the training split's own `_unknown_` clips
(1,492): `train.unknown_ratio=2.0` then draws the dataset's own `_unknown_` as often as the recipe does.
Needs the espeak-ng program (apt install espeak-ng).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from pathlib import Path

NEAR_MISSES = """
yet yell yellow yesterday guess less mess test chess press dress bless unless yarn yard young
nope note know-how noble nor north notice nobody noodle snow slow blow low go-kart toe though
cup pup hop hub hut hug ugh uh-oh upper update upon cop shut
town gown crown brown round sound ground count clown downtown dial doubt
lift loft laughed lest theft deft lefty lecture lemon lend length
bright fight light might night sight tight white rice ride rhyme write-up ripe rider frighten
top step shop stock stomp stove strap story stuff spot plop drop chop storm
"""
COMMON_WORDS = """
about after again against almost also always among another answer anything around because before
behind below between beyond both bring build busy call came care carry change city close cold
color come could country course cover cross daily dark deep door dream drink drive early earth
east easy either empty even evening every face fall family far fast father feel few field
find fire first fish flower food foot force forest fresh friend full game garden give glass
good grass great green group grow half hand hard head hear heart heavy help here high hold
home horse hour hundred idea inside island just keep kind king kitchen large late laugh
leave letter life line listen little long look lot love machine make many market matter
maybe money month moon morning mother mountain move music name near never new next nothing
number ocean often old only open order other outside over page paper party people person picture
piece place plan plant play please point power problem pull push question quick quiet radio rain
reach read ready real remember rest river road rock room rule run same school sea season second
seem sentence shape ship short should show side simple since sister sit small smile
something song soon speak special spring square stand star start still street strong study summer
sun sure table take talk teacher tell than thank that their there these thing think this those
thousand through time today together tomorrow took toward travel true turn under until
usual very voice walk wall want warm watch water weather week well west what when where which
while window winter with without woman wonder word work world would year
"""
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--takes", type=int, default=4, help="recordings of each word")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("synthetic_negatives: espeak-ng is not installed (apt install espeak-ng)")

    words = sorted(set((NEAR_MISSES + COMMON_WORDS).split()))
    chooser = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for word in words:
        for take in range(args.takes):
            voice = f"{chooser.choice(VOICES)}+{chooser.choice(VARIANTS)}"
            speed, pitch = chooser.randint(120, 200), chooser.randint(25, 75)
            path = args.out / f"{word}_{take}.wav"
            command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path)]
            subprocess.run([*command, word.replace("-", " ")], check=True)
    print(f"{len(words) * args.takes} clips of {len(words)} words in {args.out}")


if __name__ == "__main__":
    main()
