"""Typed configuration from TOML, shared by the agent and the coordinator.

A config is a tree of frozen dataclasses with a default for every field. `build_table` checks a
parsed TOML table against one: unknown keys and wrongly typed values are ConfigErrors naming the
key's full path, so a typo in a fleet-wide config fails loudly at start.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar, get_type_hints

from core.errors import ConfigError

MIGRATION_MODES = ("auto", "precopy", "lazy", "hybrid")
"""The migration modes an agent's config, the agent's API and the coordinator's API accept."""

T = TypeVar("T")


def build_table(cls: type[T], data: Any, where: str) -> T:
    """`data` (a parsed TOML table) as an instance of the dataclass `cls`. Nested dataclasses are
    tables, `tuple[Dataclass, ...]` fields are arrays of tables, `tuple[str, ...]` fields are arrays of
    strings, `dict[str, str]` fields are tables of free-form strings; everything else is a scalar of the
    annotated type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_table(hint, value, path)  # type: ignore[arg-type]
        elif (item := _table_array_item(hint)) is not None:
            if not isinstance(value, list):
                raise ConfigError(f"{path}: expected an array of tables")
            kwargs[key] = tuple(build_table(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        elif hint == tuple[str, ...]:  # an array of strings (pull.allowed_registries)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: expected an array of strings")
            kwargs[key] = tuple(value)
        elif hint == dict[str, str]:  # a table of free-form string pairs (coordinator.labels)
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{path}: expected a table of strings")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _check_scalar(hint, value, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _table_array_item(hint: Any) -> type | None:
    """The dataclass X of a `tuple[X, ...]` annotation, else None."""
    if typing.get_origin(hint) is not tuple:
        return None
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0]  # type: ignore[return-value]
    return None


def _check_scalar(hint: Any, value: Any, path: str) -> Any:
    allowed: tuple[type, ...]
    text = str(hint)
    if hint is bool:
        allowed = (bool,)
    elif hint is int:
        allowed = (int,)
    elif hint is float:
        allowed = (int, float)
    elif "str" in text:
        allowed = (str,)
    else:
        allowed = (object,)
    if isinstance(value, bool) and hint is not bool:
        raise ConfigError(f"{path}: expected {text}, got a boolean")
    if not isinstance(value, allowed):
        raise ConfigError(f"{path}: expected {text}, got {type(value).__name__}")
    if hint is float:
        return float(value)  # type: ignore[arg-type]  # ints are fine where floats are expected
    return value
