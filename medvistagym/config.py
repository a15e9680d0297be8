"""Config dataclasses from YAML files and `key=value` overrides (dotted for nesting).

    cfg = load_config(EnvConfig, "env.yaml", ["max_turns=4", "reward.format_weight=0.2"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """`value` (from YAML or a command line string) as the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        items = yaml.safe_load(value) if isinstance(value, str) else value
        if isinstance(items, str):
            items = [s.strip() for s in items.split(",") if s.strip()]
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        return origin(_coerce(item_tp, v, where) for v in items)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where}: expected true/false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if tp in (int, float):
        try:
            return tp(yaml.safe_load(value) if isinstance(value, str) else value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from err
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()})  # type: ignore[call-arg]


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        config = _set(config, key.strip().split("."), value, key)
    return config


def _set(obj: Any, path: list[str], value: str, full: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ConfigError(f"override {full!r}: unknown key {path[0]!r}; known: {sorted(names)}")
    hint = typing.get_type_hints(type(obj))[path[0]]
    current = getattr(obj, path[0])
    new = _set(current, path[1:], value, full) if len(path) > 1 else _coerce(hint, value, full)
    return dataclasses.replace(obj, **{path[0]: new})


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return apply_overrides(from_dict(cls, data, ""), overrides)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
