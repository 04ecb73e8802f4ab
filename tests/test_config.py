"""Recipes: YAML into validated frozen dataclasses, errors that name the key, and --set overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from kws.config import (
    ARCHITECTURE_NAMES,
    PRESETS,
    DataConfig,
    FeatureConfig,
    apply_overrides,
    load_recipe,
    parse_override,
    read_yaml,
)
from kws.errors import ConfigError, KWSError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_no_recipe_gives_the_defaults():
    recipe = load_recipe()
    assert recipe.data == DataConfig()
    assert recipe.features == FeatureConfig()


def test_a_recipe_sets_each_section_from_yaml(tmp_path):
    path = write_recipe(
        tmp_path,
        "data:\n  words: [yes, no]\n  silence_db_range: [-70, -40]\n  validation_speakers: alice\n"
        "features:\n  n_mels: 64\n  clip_s: 1\n  f_max: null\n  kind: mfcc\n  n_mfcc: 13\n",
    )
    recipe = load_recipe(path)
    assert recipe.data.words == ("yes", "no")
    assert recipe.data.silence_db_range == (-70.0, -40.0)
    assert recipe.data.validation_speakers == ("alice",)  # one name is a list of one
    assert recipe.features == FeatureConfig(n_mels=64, clip_s=1.0, f_max=None, kind="mfcc", n_mfcc=13)
    assert isinstance(recipe.features.clip_s, float)


def test_numbers_in_a_word_list_are_read_as_words(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "data:\n  words: [0, 1, 2]\n"))
    assert recipe.data.words == ("0", "1", "2")


def test_words_such_as_yes_no_on_and_off_stay_words(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "data:\n  words: [yes, no, on, off]\n  unknown: false\n"))
    assert recipe.data.words == ("yes", "no", "on", "off")
    assert recipe.data.unknown is False
    recipe = load_recipe(overrides=["data.words=[yes, off]", "data.unknown=true"])
    assert (recipe.data.words, recipe.data.unknown) == (("yes", "off"), True)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("features:\n  n_melz: 64\n", "features.n_melz"),
        ("data:\n  word: [yes]\n", "data.word"),
        ("featurez:\n  n_mels: 64\n", "featurez"),
    ],
)
def test_unknown_key_is_a_config_error_naming_the_dotted_key(tmp_path, text, key):
    path = write_recipe(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"unknown setting\(s\): {key}\b") as error:
        load_recipe(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("features:\n  n_mels: forty\n", "features.n_mels"),
        ("features:\n  n_mels: 40.5\n", "features.n_mels"),
        ("features:\n  n_mels: true\n", "features.n_mels"),
        ("features:\n  clip_s: one\n", "features.clip_s"),
        ("features:\n  f_max: high\n", "features.f_max"),
        ("data:\n  words: {yes: 1}\n", "data.words"),
        ("data:\n  words: [[yes]]\n", r"data.words\[0\]"),
        ("data:\n  unknown: maybe\n", "data.unknown"),
        ("data: [yes, no]\n", "data"),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_dotted_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf": {key}: "):
        load_recipe(write_recipe(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "key"),
    [("features.n_mels=0", "features.n_mels"), ("features.kind=wavelet", "features.kind"),
     ("data.layout=tree", "data.layout"), ("data.silence_db_range=[-10, -20]", "data.silence_db_range"),
     ("train.negative_speech_candidates=0", "train.negative_speech_candidates")],
)  # fmt: skip
def test_out_of_range_value_is_an_error_naming_the_key(override, key):
    with pytest.raises(KWSError, match=key):
        load_recipe(overrides=[override])


def test_recipe_that_is_not_a_mapping_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_recipe(write_recipe(tmp_path, "- data\n- features\n"))


def test_invalid_yaml_is_a_config_error_on_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_recipe(write_recipe(tmp_path, "features: [n_mels: 40\n"))
    assert "\n" not in str(error.value)


def test_missing_recipe_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_parse_override_reads_the_value_as_yaml():
    assert parse_override("features.n_mels=64") == (["features", "n_mels"], 64)
    assert parse_override("features.f_max=null") == (["features", "f_max"], None)
    assert parse_override("data.words=[yes, no]") == (["data", "words"], ["yes", "no"])
    assert parse_override("data.path=/a/b=c") == (["data", "path"], "/a/b=c")


@pytest.mark.parametrize("text", ["features.n_mels", "=64"])
def test_parse_override_without_key_or_equals_is_a_config_error(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_apply_overrides_sets_nested_keys_without_changing_the_original():
    values = {"features": {"n_mels": 40, "kind": "logmel"}}
    result = apply_overrides(values, ["features.n_mels=64", "data.words=[yes]"])
    assert result == {"features": {"n_mels": 64, "kind": "logmel"}, "data": {"words": ["yes"]}}
    assert values == {"features": {"n_mels": 40, "kind": "logmel"}}


def test_apply_overrides_refuses_to_descend_into_a_value():
    with pytest.raises(ConfigError, match="n_mels is a value, not a section"):
        apply_overrides({"features": {"n_mels": 40}}, ["features.n_mels.x=1"])


def test_overrides_win_over_the_recipe_file(tmp_path):
    path = write_recipe(tmp_path, "features:\n  n_mels: 40\n  clip_s: 1.0\n")
    recipe = load_recipe(path, ["features.n_mels=64", "features.clip_s=0.5"])
    assert (recipe.features.n_mels, recipe.features.clip_s) == (64, 0.5)


def test_unknown_override_key_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"the default recipe: unknown setting\(s\): features.n_melz"):
        load_recipe(overrides=["features.n_melz=64"])


def test_relative_data_path_is_taken_from_the_recipes_folder(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = load_recipe(write_recipe(folder, "data:\n  path: ../data/speech\n"))
    assert Path(recipe.data.path) == folder / ".." / "data" / "speech"


def test_extra_words_paths_are_taken_from_the_recipes_folder_and_labels_read_as_text(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    text = "data:\n  extra_words:\n    - path: ../sc\n      words: [zero, one]\n      labels: [0, 1]\n"
    (borrowed,) = load_recipe(write_recipe(folder, text)).data.extra_words
    assert Path(borrowed.path) == folder / ".." / "sc"
    assert borrowed.label_of() == {"zero": "0", "one": "1"}


def test_extra_words_unknown_key_is_a_config_error_naming_it(tmp_path):
    text = "data:\n  extra_words:\n    - path: sc\n      words: [zero]\n      rate: 8000\n"
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): data.extra_words\[0\].rate"):
        load_recipe(write_recipe(tmp_path, text))


def test_absolute_data_path_and_overridden_path_are_kept_as_given(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"data:\n  path: {tmp_path / 'x'}\n"))
    assert Path(recipe.data.path) == tmp_path / "x"
    recipe = load_recipe(write_recipe(tmp_path, "data:\n  path: x\n"), ["data.path=elsewhere"])
    assert recipe.data.path == "elsewhere"


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    written = read_yaml(path)["data"].get("path")  # new_word.yaml's is filled in by kws train-word
    assert recipe.data.path is None if written is None else Path(recipe.data.path) == path.parent / written
    assert recipe.features == FeatureConfig(**read_yaml(path)["features"])


def test_the_shipped_recipes_are_found():
    assert {path.name for path in RECIPES} >= {"speech_commands.yaml", "fsdd.yaml"}


def test_reading_and_checking_every_shipped_recipe_imports_no_torch():
    code = (
        "import sys\nfrom kws.config import load_recipe\n"
        + "".join(f"load_recipe({str(path)!r})\n" for path in RECIPES)
        + "print(sorted(name for name in ('torch', 'numpy', 'librosa') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_architecture_names_recipes_accept_are_the_ones_kws_models_builds():
    from kws.models import ARCHITECTURES

    assert set(ARCHITECTURE_NAMES) == set(ARCHITECTURES)
    assert {architecture for architecture, _ in PRESETS.values()} <= set(ARCHITECTURES)
