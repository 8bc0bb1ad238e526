"""Typed configuration: dataclasses built strictly from nested dicts (params.yaml, presets).

Unknown keys, wrong types and bad override syntax are errors that name where they came from,
so a typo in params.yaml never silently falls back to a default.

Every params file is read and written with YAML 1.2's core schema, the one DVC reads and rewrites
params.yaml with (`dvc exp run -S` dumps through ruamel.yaml): `off`, `on`, `yes`, `no` are strings and
`1e-3` is a float for every writer, where PyYAML's default YAML 1.1 reads `off` as false and `1e-3` as a
string.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from pgolf.errors import ConfigError

T = TypeVar("T")


def _core_schema_resolvers() -> dict:
    """YAML 1.2 core schema (yaml.org/spec/1.2.2, 10.3.2): the only implicit types besides strings."""
    rules = [
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("tag:yaml.org,2002:float",
         r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
         "-+.0123456789"),
    ]
    resolvers: dict = {}
    for tag, pattern, first in rules:
        for ch in first:
            resolvers.setdefault(ch, []).append((tag, re.compile(pattern)))
    return resolvers


class CoreSchemaLoader(yaml.SafeLoader):
    """PyYAML's safe loader resolving plain scalars as YAML 1.2 does."""

    yaml_implicit_resolvers = _core_schema_resolvers()


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text[2:], 8) if text.startswith("0o") else int(text, 0) if text.startswith("0x") else int(text)


def _construct_core_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


CoreSchemaLoader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)
CoreSchemaLoader.add_constructor("tag:yaml.org,2002:float", _construct_core_float)


class CoreSchemaDumper(yaml.SafeDumper):
    """Quotes every string that either schema would read as something else (`off`, `1e-3`, `0o7`), so
    what it writes means the same to YAML 1.1 readers (PyYAML's default) and 1.2 ones (DVC, pgolf)."""

    yaml_implicit_resolvers = {ch: list(rules) for ch, rules in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    for _ch, _rules in _core_schema_resolvers().items():
        yaml_implicit_resolvers.setdefault(_ch, []).extend(_rules)
    del _ch, _rules


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=CoreSchemaLoader)


def dump_yaml_text(data: Any, **kwargs) -> str:
    return yaml.dump(data, Dumper=CoreSchemaDumper, **kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_hint, *rest) = get_args(hint) or (Any,)
        items = [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint}")


def from_dict(cls: type[T], data: dict | None, where: str) -> T:
    """Build dataclass `cls` from `data`; every key must be a field, every value the field's type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def deep_merge(base: dict, overlay: dict) -> dict:
    """Overlay wins key by key; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """`train.model.num_layers=11` -> {"train": {"model": {"num_layers": 11}}} (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected SECTION.KEY=VALUE")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {err}") from err
    node: dict = {}
    parts = key.strip().split(".")
    cursor = node
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def check_range(obj: Any, names: str, **bounds: float) -> None:
    """Raise ValueError unless each of the space-separated numeric fields `names` of `obj` is a
    finite number within `bounds` (ge, gt, le, lt). The configs' validate() call it, so a value out
    of range is refused when params are rendered and again when a stage reads them."""
    for name in names.split():
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} {value!r} must be a finite number")
        if not all(_BOUNDS[kind][1](value, bound) for kind, bound in bounds.items()):
            limits = " and ".join(f"{_BOUNDS[kind][0]} {bound:g}" for kind, bound in bounds.items())
            raise ValueError(f"{name} {value!r} must be {limits}")
