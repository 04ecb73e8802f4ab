"""Model cards: `kws train` records how a model was made, `kws card --data --write` measures and stores
the rest, and `kws models` shows it. Trained on the made-up words of conftest (tones and a chirp)."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kws.card import count_macs
from kws.checkpoint import load_model, read_info, read_tensors, rewrite_info
from kws.cli import app


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_macs_of_a_convolution_and_a_linear_layer_are_counted_as_by_hand():
    samples = 100
    model = nn.Sequential(nn.Unflatten(1, (1, samples)), nn.Conv1d(1, 4, 5), nn.Flatten(), nn.Linear(4 * 96, 3))
    assert count_macs(model, samples) == 4 * 5 * 96 + 4 * 96 * 3


@pytest.fixture
def trained(recipe_path, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = run("train", recipe_path, "--out", out, "--epochs", "2", "--cache", tmp_path / "features",
                          "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    return out / "best.safetensors"


def test_kws_train_records_the_command_seed_epochs_and_time_in_the_card(trained, recipe_path, tmp_path):
    training = read_info(trained).card["training"]
    assert training["command"] == (
        f"kws train {recipe_path} --out {tmp_path / 'run'} --set train.epochs=2 --device cpu"
    )
    assert training["seed"] == 0 and training["epochs"] == 2 and training["best_epoch"] in (1, 2)
    assert training["minutes"] >= 0 and "CPU" in training["where"]


def test_a_fine_tunes_card_keeps_how_its_init_was_made_and_kws_card_prints_the_chain(trained, recipe_path, tmp_path):
    out = tmp_path / "tuned"
    code, _, stderr = run("train", recipe_path, "--out", out, "--epochs", "1", "--init", trained,
                          "--cache", tmp_path / "features", "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    training = read_info(out / "best.safetensors").card["training"]
    assert training["command"].endswith(f"--init {trained}")
    assert training["init"] == read_info(trained).card["training"]
    code, stdout, _ = run("card", out)
    assert code == 0
    lines = stdout.splitlines()
    made = [index for index, line in enumerate(lines) if "trained with" in line]
    assert len(made) == 2 and made[1] == made[0] + 1
    assert f"--init {trained}" in lines[made[0]] and "from a model trained with `kws train" in lines[made[1]]
    assert f"--out {tmp_path / 'run'}" in lines[made[1]]


def test_a_students_card_keeps_how_its_teacher_was_made(trained, recipe_path, tmp_path):
    out = tmp_path / "student"
    code, _, stderr = run("train", recipe_path, "--out", out, "--epochs", "1", "--set",
                          f"train.distill.teachers=[{trained}]", "--cache", tmp_path / "features",
                          "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    training = read_info(out / "best.safetensors").card["training"]
    assert training["teachers"] == [read_info(trained).card["training"]] and "init" not in training
    code, stdout, _ = run("card", out)
    taught = [line for line in stdout.splitlines() if "taught by a model trained with `kws train" in line]
    assert code == 0 and len(taught) == 1 and f"--out {tmp_path / 'run'}" in taught[0]


def test_kws_card_measures_and_stores_the_card_keeping_the_weights(trained, words_folder, tmp_path):
    before = read_tensors(trained, "model")
    code, stdout, stderr = run("card", trained, "--data", words_folder, "--write", "--json", tmp_path / "card.json")
    assert code == 0, stderr
    card = read_info(trained).card
    assert card == json.loads((tmp_path / "card.json").read_text())
    after = read_tensors(trained, "model")
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)

    report = json.loads((trained.parent / "report.json").read_text())["test"]
    assert card["test"]["accuracy"] == pytest.approx(report["accuracy"], abs=1e-5)
    assert card["test"]["recall"] == pytest.approx(
        {label: values["recall"] for label, values in report["per_class"].items()}, abs=1e-4
    )
    assert card["test"]["speakers"] == 1  # spk5
    assert card["training"]["epochs"] == 2  # kept from kws train
    model, info = load_model(trained)
    assert card["macs"]["per_window"] == count_macs(model, info.features.clip_samples)
    assert card["macs"]["per_second_streaming"] == pytest.approx(10 * card["macs"]["per_window"], rel=1e-6)
    assert card["cpu_latency_ms"]["median"] > 0
    stream = card["stream"]
    assert stream["keywords_spoken"] == 6 and stream["other_words"] == 3  # spk5: 3 yes, 3 no, 3 cat
    assert 0 <= stream["hit_rate"] <= 1 and stream["false_accepts_per_hour"] >= 0
    assert f"{100 * card['test']['accuracy']:.2f}% accuracy" in stdout

    code, stdout, _ = run("card", trained)
    assert code == 0 and "false accepts per hour" in stdout and "kws train" in stdout
    code, stdout, _ = run("models", trained)
    line = next(line for line in stdout.splitlines() if "best.safetensors" in line)
    assert f"{stream['false_accepts_per_hour']:.1f}*" in line
    code, stdout, _ = run("models", trained, "--format", "jsonl")
    row = json.loads(stdout.splitlines()[-1])
    assert row["mmacs_per_window"] == round(card["macs"]["per_window"] / 1e6, 2)


def test_kws_card_write_without_data_is_a_usage_error(trained):
    code, _, stderr = run("card", trained, "--write")
    assert code == 2 and "--data" in stderr


def test_a_model_without_a_card_says_how_to_measure_one(trained, tmp_path):
    rewrite_info(trained, replace(read_info(trained), card={}))
    code, stdout, _ = run("card", trained)
    assert code == 0 and "no card yet" in stdout
