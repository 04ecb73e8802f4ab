"""An installed kws (a wheel, not this checkout) carries its shipped models and finds them from any folder."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_YES = ROOT.parent / "shared" / "data" / "speech_commands" / "yes"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, unpacked as pip would install it: a folder to put on sys.path."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(ROOT)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = folder.glob("kws-*.whl")
    site = folder / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def run_installed(site: Path, cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m kws ...` from `cwd` with only the installed copy of kws importable."""
    environment = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment, capture_output=True, text=True)


def test_the_wheel_carries_every_shipped_model(installed):
    shipped = sorted(path.name for path in (ROOT / "models").glob("*.safetensors"))
    assert shipped and sorted(path.name for path in (installed / "kws" / "shipped_models").iterdir()) == shipped


def test_an_installed_kws_imports_from_the_install_and_finds_its_models_by_name(installed, tmp_path):
    code = "import kws.checkpoint as c; print(c.__file__); print(c.resolve_model_path('speech_commands'))"
    result = run_installed(installed, tmp_path, "-c", code)
    module, model = result.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(model).is_relative_to(installed), result.stderr


def test_an_installed_kws_classifies_with_the_default_model_from_another_folder(installed, tmp_path, write_wav):
    clips = tmp_path / "clips"
    write_wav(clips / "tone.wav", 0.1 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    if SHARED_YES.is_dir():
        for path in sorted(SHARED_YES.glob("*.wav"))[:20]:
            (clips / path.name).write_bytes(path.read_bytes())
    result = run_installed(installed, tmp_path, "-m", "kws", "classify", "clips", "--format", "jsonl", "--top-k", "1")
    assert result.returncode == 0, result.stderr
    labels = {row["path"]: row["label"] for row in map(json.loads, result.stdout.splitlines())}
    assert len(labels) == len(list(clips.iterdir()))
    known = ("_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "stop")
    assert set(labels.values()) <= set(known)
    if SHARED_YES.is_dir():
        heard_yes = sum(label == "yes" for file, label in labels.items() if "nohash" in file)
        assert heard_yes >= 17, labels
