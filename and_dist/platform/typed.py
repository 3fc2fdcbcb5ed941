"""Typed dataclass configs from mappings and `a.b=value` overrides, with one-line errors.

Generic: driven by the dataclass fields, their type hints and their metadata (allowed choices,
range checks), so a schema (config.py) declares a field in one line and gets parsing,
type checking, "did you mean" suggestions and validation for free.
"""
from __future__ import annotations

import difflib
import functools
import re
import types
from dataclasses import field, fields, is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A user mistake in the configuration; the message is one line meant for the terminal."""


# ----- field helpers: choices and range checks live in field metadata so validation is generic

POSITIVE = ("must be > 0", lambda v: v > 0)
NON_NEGATIVE = ("must be >= 0", lambda v: v >= 0)
AT_LEAST_ONE = ("must be >= 1", lambda v: v >= 1)
MOMENTUM = ("must be in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY = ("must be in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION = ("must be in (0, 1]", lambda v: 0 < v <= 1)
SCALE_RANGE = ("must be [min, max] with 0 < min <= max <= 1",
               lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1)


def opt(default, help: str = "", *, choices: tuple = (), check: tuple | None = None):
    """A dataclass field carrying its one-line help, allowed choices and/or range check."""
    meta = {"help": help, "choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----- YAML: PyYAML (YAML 1.1) reads `1e-3` as a string; accept it as a float like users expect

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        detail = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(e)
        raise ConfigError(f"cannot parse {where}: {' '.join(detail.split())}") from None


# ----- generic typed merge

@functools.cache
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def describe_value(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _coerce(path: str, tp, value):
    """Return `value` checked against type `tp` (ints widen to float; bools are not ints)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(path, arg, value)
                except ConfigError:
                    pass
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{path}[{i}]", args[0], v) for i, v in enumerate(value)]
    elif tp is float and type(value) is int:
        return float(value)
    elif type(value) is tp:
        return value
    raise ConfigError(f"config key '{path}' expects {_type_name(tp)}, got {describe_value(value)}")


def _unknown_key(obj, path: str) -> ConfigError:
    """Name the bad key and suggest close valid keys of the same section (or list them all)."""
    section, _, name = path.rpartition(".")
    valid = list(_hints(type(obj)))
    full = (lambda k: f"{section}.{k}") if section else (lambda k: k)
    close = difflib.get_close_matches(name, valid, n=3)
    if not close:  # e.g. `batch_size=3` given without its section
        close = [f"{k}.{name}" for k in valid
                 if is_dataclass(getattr(obj, k)) and name in _hints(type(getattr(obj, k)))]
    if close:
        return ConfigError(f"unknown config key '{path}'; did you mean "
                           + " or ".join(f"'{full(k)}'" for k in close) + "?")
    where = f"under '{section}'" if section else "at the top level"
    return ConfigError(f"unknown config key '{path}'; valid keys {where}: {', '.join(valid)}")


def _assign(obj, name: str, value, path: str) -> None:
    """Set one field: sections merge a mapping recursively, leaves are type-checked."""
    current = getattr(obj, name)
    if is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' is a section and expects a mapping, "
                              f"got {describe_value(value)}")
        merge(current, value, path)
    else:
        setattr(obj, name, _coerce(path, _hints(type(obj))[name], value))


def merge(obj, mapping: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise _unknown_key(obj, path)
        _assign(obj, key, value, path)


def apply_override(cfg, text: str) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=0.1)")
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if part not in _hints(type(obj)):
            raise _unknown_key(obj, path)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not is_dataclass(obj):
                raise ConfigError(f"config key '{path}' is a value, not a section; "
                                  f"cannot set '{key}'")
    tp = _hints(type(obj))[parts[-1]]
    value = "" if not raw.strip() else yaml_load(raw, f"override '{text}'")
    if tp is str and value is not None and not isinstance(value, str):  # name=2024 means text
        value = raw.strip()
    _assign(obj, parts[-1], value, key)


def check_fields(obj, prefix: str = "") -> None:
    hints = _hints(type(obj))
    for f in fields(obj):
        path, value = prefix + f.name, getattr(obj, f.name)
        if is_dataclass(value):
            check_fields(value, path + ".")
            continue
        value = _coerce(path, hints[f.name], value)
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise ConfigError(f"config key '{path}' must be one of {', '.join(choices)}; "
                              f"got {value!r}")
        if check and value is not None and not check[1](value):
            raise ConfigError(f"config key '{path}' {check[0]}; got {value!r}")
