"""Frozen dataclasses from plain values (YAML, JSON): every key and type checked, errors name the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from kws.errors import ConfigError

T = TypeVar("T")


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
    arguments = {name: _convert(hints[name], value, f"{key}.{name}" if key else name) for name, value in values.items()}
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
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads a word such as 1 or 0.5 as a number
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: {value!r} is not a valid {_describe(hint)}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
