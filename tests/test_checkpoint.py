"""Checkpoints: safetensors weights plus a JSON description; loads give the saved model bit for bit."""

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import kws.checkpoint
from kws.checkpoint import SHIPPED_MODELS, ModelInfo, load_model, read_info, read_tensors, save_checkpoint
from kws.config import FeatureConfig, ModelConfig
from kws.errors import ModelError
from kws.models import build_model, count_parameters

FEATURES = FeatureConfig(clip_s=0.5, n_mels=32, f_max=7600.0)
LABELS = ("_silence_", "_unknown_", "yes", "no")
RECIPE = {"model": {"name": "resnet_tiny", "dropout": 0.3}, "train": {"epochs": 3, "seed": 7}}
METRICS = {"epoch": 2, "validation_accuracy": 0.875, "test": None}


@pytest.fixture
def waveforms(chirp, noise) -> torch.Tensor:
    clips = [chirp(100, 7000, 0.5, amplitude=0.3), noise(0.5, seed=1), noise(0.5, rms=0.01, seed=2)]
    return torch.from_numpy(np.stack(clips))


def used_model(preset: str, waveforms: torch.Tensor) -> tuple[torch.nn.Module, ModelInfo]:
    """A model whose BatchNorm statistics have moved away from their initial values, and its description."""
    architecture, arguments = ModelConfig(name=preset).architecture()
    model = build_model(architecture, arguments, len(LABELS), FEATURES).train()
    with torch.no_grad():
        for scale in (1.0, 0.3, 2.0):
            model(waveforms * scale)
    return model.eval(), ModelInfo(architecture, arguments, FEATURES, LABELS, RECIPE, METRICS)


@pytest.mark.parametrize("preset", ["resnet_tiny", "firnet_small"])
def test_a_loaded_checkpoint_gives_bit_identical_outputs_in_eval_mode(preset, waveforms, tmp_path):
    model, info = used_model(preset, waveforms)
    save_checkpoint(tmp_path / "model.safetensors", model, info)
    loaded, _ = load_model(tmp_path / "model.safetensors")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(waveforms), model(waveforms))
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[name], loaded_state[name]) for name in saved_state)


def test_the_description_survives_the_round_trip(waveforms, tmp_path):
    model, info = used_model("firnet_small", waveforms)
    save_checkpoint(tmp_path / "model.safetensors", model, info)
    loaded_info = read_info(tmp_path / "model.safetensors")
    assert loaded_info.architecture == "firnet"
    assert loaded_info.arguments == {"widths": [48, 48, 64, 96], "dropout": 0.3, "init": "mel"}  # JSON lists
    assert loaded_info.features == FEATURES
    assert loaded_info.labels == LABELS
    assert loaded_info.recipe == RECIPE
    assert loaded_info.metrics == METRICS
    assert load_model(tmp_path / "model.safetensors")[1] == loaded_info


def test_extra_tensors_are_stored_apart_from_the_weights(waveforms, tmp_path):
    model, info = used_model("resnet_tiny", waveforms)
    step = torch.tensor([3.0])
    save_checkpoint(tmp_path / "model.safetensors", model, info, extra={"optimizer.step": step})
    assert read_tensors(tmp_path / "model.safetensors", "extra") == {"optimizer.step": step}
    assert read_tensors(tmp_path / "model.safetensors", "model").keys() == model.state_dict().keys()


def test_the_file_is_safetensors_with_the_description_as_json_metadata(waveforms, tmp_path):
    model, info = used_model("resnet_tiny", waveforms)
    save_checkpoint(tmp_path / "model.safetensors", model, info)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        description = json.loads(handle.metadata()["kws"])
        keys = set(handle.keys())
    assert description["labels"] == list(LABELS)
    assert description["features"] == FEATURES.to_dict()
    assert description["sample_rate"] == 16000 and description["format"] == kws.checkpoint.FORMAT_VERSION
    assert keys == {f"model.{name}" for name in model.state_dict()}


def test_loading_never_unpickles(waveforms, tmp_path, monkeypatch):
    model, info = used_model("resnet_tiny", waveforms)
    save_checkpoint(tmp_path / "model.safetensors", model, info)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded, _ = load_model(tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(waveforms), model(waveforms))


def test_a_run_folder_loads_its_best_model(waveforms, tmp_path):
    model, info = used_model("resnet_tiny", waveforms)
    save_checkpoint(tmp_path / "run" / "best.safetensors", model, info)
    loaded, loaded_info = load_model(tmp_path / "run")
    assert loaded_info.labels == LABELS
    with torch.no_grad():
        assert torch.equal(loaded(waveforms), model(waveforms))


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint at all" * 10)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def damaged_description(path: Path) -> None:
    """One byte of the JSON description changed: the safetensors header still parses, the description not."""
    data = path.read_bytes()
    start = data.index(b'"kws":"{') + len(b'"kws":"')
    path.write_bytes(data[:start] + b"x" + data[start + 1 :])


def not_kws(path: Path) -> None:
    safetensors.torch.save_file({"weight": torch.zeros(3)}, str(path), metadata={"framework": "pt"})


def other_format(path: Path) -> None:
    description = json.dumps({"format": 99, "labels": ["a"]})
    safetensors.torch.save_file({"model.weight": torch.zeros(3)}, str(path), metadata={"kws": description})


def rewritten_description(change) -> Callable[[Path], None]:
    """A damage that rewrites the kws description with `change(values)` applied, keeping the tensors."""

    def damage(path: Path) -> None:
        tensors = safetensors.torch.load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            values = json.loads(handle.metadata()["kws"])
        change(values)
        safetensors.torch.save_file(tensors, str(path), metadata={"kws": json.dumps(values)})

    damage.__name__ = change.__name__
    return damage


def without_labels(values: dict) -> None:
    del values["labels"]


def unexpected_argument(values: dict) -> None:
    values["arguments"]["depth_of_field"] = 3


def unknown_architecture(values: dict) -> None:
    values["architecture"] = "transformer"


def missing_weight(path: Path) -> None:
    tensors = safetensors.torch.load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    del tensors[next(name for name in tensors if name.startswith("model.") and name.endswith(".weight"))]
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (rewritten_description(without_labels), "lacks labels"),
        (rewritten_description(unexpected_argument), "cannot build the described resnet model .*depth_of_field"),
        (rewritten_description(unknown_architecture), "cannot build the described transformer model"),
        (missing_weight, "weights do not fit the described model .*Missing key"),
        (truncated, "not a readable checkpoint"),
        (garbage, "not a readable checkpoint"),
        (empty, "not a readable checkpoint"),
        (damaged_description, "description"),
        (not_kws, "not a kws model"),
        (other_format, "format 99"),
    ],
    ids=lambda value: getattr(value, "__name__", value),
)
def test_a_file_that_is_not_a_good_kws_checkpoint_raises_model_error_naming_it(damage, reason, waveforms, tmp_path):
    model, info = used_model("resnet_tiny", waveforms)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, info)
    damage(path)
    with pytest.raises(ModelError, match=reason) as raised:
        load_model(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_weights_that_do_not_fit_the_description_raise_model_error(waveforms, tmp_path):
    model, info = used_model("resnet_tiny", waveforms)
    save_checkpoint(tmp_path / "model.safetensors", model, ModelInfo(
        info.architecture, info.arguments, info.features, ("one", "two"), info.recipe, info.metrics
    ))  # fmt: skip
    with pytest.raises(ModelError, match="do not fit") as raised:
        load_model(tmp_path / "model.safetensors")
    assert str(tmp_path / "model.safetensors") in str(raised.value)


def test_a_missing_file_raises_model_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match="no such model") as raised:
        load_model(tmp_path / "nothing.safetensors")
    assert str(tmp_path / "nothing.safetensors") in str(raised.value)


def test_a_save_that_fails_halfway_leaves_the_earlier_file_and_no_partial_file(waveforms, tmp_path, monkeypatch):
    model, info = used_model("resnet_tiny", waveforms)
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, model, info)
    earlier = path.read_bytes()

    def fail_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(kws.checkpoint, "save_file", fail_halfway)
    other, _ = used_model("firnet_small", waveforms)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, other, info)
    assert path.read_bytes() == earlier
    assert sorted(item.name for item in tmp_path.iterdir()) == ["best.safetensors"]
    assert load_model(path)[1].architecture == "resnet"


def test_kws_models_lists_the_shipped_models_and_given_files(waveforms, tmp_path):
    from typer.testing import CliRunner

    from kws.cli import app

    model, info = used_model("resnet_tiny", waveforms)
    save_checkpoint(tmp_path / "mine.safetensors", model, info)
    result = CliRunner().invoke(app, ["models", str(tmp_path / "mine.safetensors"), "--format", "jsonl"])
    assert result.exit_code == 0, result.stderr
    rows = {row["model"]: row for row in map(json.loads, result.stdout.splitlines())}
    shipped = sorted(path.stem for path in SHIPPED_MODELS.glob("*.safetensors"))
    assert list(rows) == [*shipped, str(tmp_path / "mine.safetensors")]
    shipped_info = read_info(SHIPPED_MODELS / "speech_commands.safetensors")
    row = rows["speech_commands"]
    assert row["test_accuracy"] == shipped_info.card["test"]["accuracy"] and row["parameters"] == 269099
    assert row["false_accepts_per_hour"] == shipped_info.card["false_accepts"]["false_accepts_per_hour"]
    assert row["false_accepts_on"] == "continuous speech"
    assert row["keywords"] == ["yes", "no", "up", "down", "left", "right", "stop"] and row["other_labels"] == 2
    assert rows[str(tmp_path / "mine.safetensors")]["parameters"] == count_parameters(model)

    result = CliRunner().invoke(app, ["models", "--format", "csv"])
    header, *lines = result.stdout.splitlines()
    assert header.startswith("model,architecture,parameters,") and len(lines) == len(shipped)
    assert lines[shipped.index("speech_commands")].endswith(",yes no up down left right stop,2")


@pytest.mark.parametrize("columns", ["80", "200"])
def test_the_kws_models_table_keeps_every_name_whole_at_any_width(columns):
    from typer.testing import CliRunner

    from kws.cli import app

    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= int(columns)
    assert "…" not in result.stdout
    for path in SHIPPED_MODELS.glob("*.safetensors"):
        assert any(line.split()[:1] == [path.stem] for line in lines), path.stem
    speech_commands = next(line for line in lines if line.split()[:1] == ["speech_commands"])
    accuracy = read_info(SHIPPED_MODELS / "speech_commands.safetensors").card["test"]["accuracy"]
    assert "269K" in speech_commands and f"{100 * accuracy:.1f}%" in speech_commands
