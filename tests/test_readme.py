"""The README's runnable code blocks (```sh runnable) run as written, in order, on a small copy of the data.

The sandbox looks like a fresh clone beside ../shared/data: `kws/` (the working folder, with the
recipes), `shared/data/speech_commands` and `shared/data/fsdd` cut down to a few clips per word and
speaker, plus the user's own recordings the README talks about (`my_words/`, `my_words.csv`,
`new_recordings/`), made from real clips. Blocks that use the microphone get a virtual one.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = re.compile(r"^```sh runnable\n(.*?)^```", re.MULTILINE | re.DOTALL)
PER_SPLIT = {"training": 2, "validation": 1, "testing": 2}  # clips of each word in the small copy
NOISE_S = 30  # seconds kept of each background noise recording


def runnable_blocks(text: str) -> list[str]:
    return [match.group(1) for match in RUNNABLE.finditer(text)]


BLOCKS = runnable_blocks((REPO_ROOT / "README.md").read_text())


def small_speech_commands(source: Path, target: Path) -> None:
    """PER_SPLIT clips of every word, with split lists that keep the original splits, and short noise."""
    lists = {split: set((source / f"{split}_list.txt").read_text().split()) for split in ("validation", "testing")}
    kept = {"validation": [], "testing": []}
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("_")):
        taken = dict.fromkeys(PER_SPLIT, 0)
        for path in sorted(folder.glob("*.wav")):
            name = f"{folder.name}/{path.name}"
            split = next((split for split, names in lists.items() if name in names), "training")
            if taken[split] < PER_SPLIT[split]:
                taken[split] += 1
                (target / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / name)
                if split in kept:
                    kept[split].append(name)
    for split, names in kept.items():
        (target / f"{split}_list.txt").write_text("".join(f"{name}\n" for name in names))
    (target / "_background_noise_").mkdir()
    for path in sorted((source / "_background_noise_").glob("*.wav")):
        audio, rate = soundfile.read(path, frames=NOISE_S * 48000, dtype="int16")
        soundfile.write(target / "_background_noise_" / path.name, audio[: NOISE_S * rate], rate)


def small_fsdd(source: Path, target: Path, per_digit: int = 2) -> None:
    (target / "recordings").mkdir(parents=True)
    for path in sorted((source / "recordings").glob("*.wav")):
        if int(path.stem.rsplit("_", 1)[1]) < per_digit:
            shutil.copy(path, target / "recordings" / path.name)


def small_negatives(source: Path, target: Path, per_split: int = 3) -> None:
    """The negatives' manifest cut down to a few recordings of each split, with their files."""
    lines = (source / "manifest.csv").read_text().splitlines()
    reader = csv.DictReader(lines)
    kept, counts = [], {}
    for row in reader:
        if counts.get(row["split"], 0) < per_split:
            counts[row["split"]] = counts.get(row["split"], 0) + 1
            kept.append(row)
            (target / row["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / row["path"], target / row["path"])
    with open(target / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(kept)


def users_recordings(speech_commands: Path, work: Path) -> None:
    """What the README's "train on your own words" expects: a folder per word (two keywords, other speech,
    noise), the same clips as a manifest, and a folder of new recordings to label."""
    words = work / "my_words"
    for folder, source_words in (("lights_on", ["on"]), ("lights_off", ["off"]), ("chatter", ["go", "up", "tree"])):
        (words / folder).mkdir(parents=True)
        for word in source_words:
            for path in sorted((speech_commands / word).glob("*.wav")):
                shutil.copy(path, words / folder / path.name)
    shutil.copytree(speech_commands / "_background_noise_", words / "_background_noise_")
    rows = ["path,label,speaker"]
    for path in sorted(words.glob("[!_]*/*.wav")):
        rows.append(f"{path.relative_to(work)},{path.parent.name},{path.name.split('_nohash_')[0]}")
    (work / "my_words.csv").write_text("\n".join(rows) + "\n")
    (work / "new_recordings").mkdir()
    for path in sorted((speech_commands / "left").glob("*.wav"))[:3]:
        shutil.copy(path, work / "new_recordings" / path.name)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    data = Path(os.environ.get("KWS_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not (data / "speech_commands").is_dir() or not (data / "fsdd").is_dir():
        pytest.skip(f"real data not found at {data} (set KWS_DATA)")
    root = tmp_path_factory.mktemp("readme")
    small_speech_commands(data / "speech_commands", root / "shared" / "data" / "speech_commands")
    small_fsdd(data / "fsdd", root / "shared" / "data" / "fsdd")
    if (data / "negatives" / "manifest.csv").is_file():
        small_negatives(data / "negatives", root / "shared" / "data" / "negatives")
    work = root / "kws"
    shutil.copytree(REPO_ROOT / "recipes", work / "recipes")
    users_recordings(root / "shared" / "data" / "speech_commands", work)
    return work


def test_the_readme_has_runnable_blocks_for_every_command():
    text = "\n".join(BLOCKS)
    commands = ["dataset", "extract", "train", "evaluate", "classify", "stream", "make-stream-test", "listen",
                "models", "card", "calibrate", "mine", "synth", "export", "viz features", "viz filters",
                "viz activations", "viz cam"]  # fmt: skip
    missing = [command for command in commands if not re.search(rf"^kws {command}\b", text, re.MULTILINE)]
    assert not missing, f"no runnable README example of: {', '.join(missing)}"


def test_the_readme_stays_a_manual_of_under_about_20000_characters():
    """Measured tables and experiment logs belong in bench/RESULTS.md, which the README links."""
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text) < 21000 and "bench/RESULTS.md" in text


@pytest.mark.parametrize("block", BLOCKS, ids=[block.splitlines()[0][:40] for block in BLOCKS])
def test_readme_block_runs_as_written(block, sandbox, request):
    if re.search(r"^kws listen\b", block, re.MULTILINE):
        if shutil.which("pulseaudio") is None:
            pytest.skip("PulseAudio is not installed: no virtual microphone for kws listen")
        request.getfixturevalue("virtual_microphone")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "COLUMNS": "120"}  # fmt: skip
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=sandbox, env=environment,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, f"README block failed:\n{block}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
