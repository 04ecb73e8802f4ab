"""Recipes: YAML files loaded into frozen dataclasses, validated on load, with command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kws.data import DataConfig
from kws.errors import ConfigError
from kws.features import FeatureConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Recipe:
    """Everything a run needs, section by section, as written in `recipes/*.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build(cls: type[T], values: Any, key: str = "") -> T:
    """Build dataclass `cls` from plain `values`, checking every key and type; errors name the key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{key or 'recipe'}: expected a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown setting(s): {', '.join(where + name for name in unknown)}")
    arguments = {
        name: _convert(hints[name], value, f"{key}.{name}" if key else name) for name, value in values.items()
    }
    return cls(**arguments)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_describe(hint)}")
    if origin is tuple:
        (element, *_) = typing.get_args(hint)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(element, item, f"{key}[{index}]") for index, item in enumerate(value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads a word such as 1 or 0.5 as a number
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: {value!r} is not a valid {_describe(hint)}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`features.n_mels=64` -> (["features", "n_mels"], 64); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. features.n_mels=64")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
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
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (data, features, ...)")
    return values


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (or the defaults when `path` is None), apply overrides, validate everything.

    A relative `data.path` in a recipe file is taken relative to the folder holding the recipe.
    """
    values = read_yaml(path) if path is not None else {}
    data = values.get("data")
    if path is not None and isinstance(data, dict) and isinstance(data.get("path"), str):
        data_path = Path(os.path.expandvars(data["path"]))
        if not data_path.is_absolute():
            data["path"] = str(Path(path).parent / data_path)
    values = apply_overrides(values, overrides or [])
    source = str(path) if path is not None else "the default recipe"
    try:
        return build(Recipe, values)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
