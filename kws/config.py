"""Recipes: YAML files loaded into frozen dataclasses, validated on load, with command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kws.data import DataConfig, expand_path
from kws.errors import ConfigError
from kws.features import FeatureConfig
from kws.models import ModelConfig
from kws.settings import build
from kws.train import TrainConfig


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 reads the keywords yes, no, on and off as booleans."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


@dataclass(frozen=True)
class Recipe:
    """Everything a run needs, section by section, as written in `recipes/*.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`features.n_mels=64` -> (["features", "n_mels"], 64); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. features.n_mels=64")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: the key is empty")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Return a copy of nested `values` with each KEY=VALUE override set."""
    result = _deep_copy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(values: dict) -> dict:
    return {key: _deep_copy(value) if isinstance(value, dict) else value for key, value in values.items()}


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe not found")
    try:
        values = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (data, features, ...)")
    return values


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (or the defaults when `path` is None), apply overrides, validate everything.

    Relative paths in a recipe's `data:` section are taken relative to the folder holding the recipe;
    environment variables in them are expanded.
    """
    values = read_yaml(path) if path is not None else {}
    data = values.get("data")
    if path is not None and isinstance(data, dict):
        folder = Path(path).parent
        for key in ("path", "noise_dir"):
            if isinstance(data.get(key), str):
                data[key] = _relative_to(folder, data[key])
        for key in ("extra_unknown", "negative_speech"):
            if isinstance(data.get(key), list):
                data[key] = [_relative_to(folder, item) if isinstance(item, str) else item for item in data[key]]
        if isinstance(data.get("extra_words"), list):
            data["extra_words"] = [{**item, "path": _relative_to(folder, item["path"])}
                                   if isinstance(item, dict) and isinstance(item.get("path"), str) else item
                                   for item in data["extra_words"]]  # fmt: skip
    values = apply_overrides(values, overrides or [])
    source = str(path) if path is not None else "the default recipe"
    try:
        return build(Recipe, values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _relative_to(folder: Path, text: str) -> str:
    path = expand_path(text)
    return str(path if path.is_absolute() else folder / path)
