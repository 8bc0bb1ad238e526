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
    """PyYAML's safe loader resolving plain scalars as YAML 1.2 does, stricter than YAML about what a
    params file may hold: a key twice in one mapping is an error (YAML keeps the last, so a typo'd
    second `vocab_size:` would silently win), and so is an alias (`*name`): params need none, and
    nested aliases expand exponentially (a "billion laughs" document hangs whatever reads it)."""

    yaml_implicit_resolvers = _core_schema_resolvers()

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias (*{shown(event.anchor)}) is not allowed in a "
                                              "params file: write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {shown(key)} appears twice in one "
                                                        "mapping: keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    digits = len(text.lstrip("+-"))
    if digits > 4000:  # int() refuses past 4,300 digits; so large a value is only ever refused, by its size
        return 10 ** (digits - 1) * (-1 if text.startswith("-") else 1)
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


def shown(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: an error message never grows with a huge value (an
    integer of a million digits cannot even be printed whole: Python refuses past 4,300)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}...({len(text):,} characters)"


# Integers beyond int64 fit no tensor, index or counter any stage keeps.
INT_LIMIT = 2**63 - 1


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {shown(value)} matches none of {hint}")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {shown(value)} is not one of {list(get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        (item_hint, *rest) = get_args(hint) or (Any,)
        items = [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
            value = int(value)
        if abs(value) > INT_LIMIT:
            raise ConfigError(f"{where}: {shown(value)} is out of range: integers must be within +-(2^63 - 1)")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}")
        if isinstance(value, int) and abs(value) > INT_LIMIT:
            raise ConfigError(f"{where}: {shown(value)} is out of range: numbers must be within +-(2^63 - 1)")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shown(value)}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint}")


def from_dict(cls: type[T], data: dict | None, where: str) -> T:
    """Build dataclass `cls` from `data`; every key must be a field, every value the field's type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {shown(data)}")
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


# Field metadata of a setting added after outputs first recorded their configs (every new field is
# declared with it): at its default it is left out of params.yaml (runner.params.render) and of what
# a stage writes (from_dict fills it back in), so a run that does not use it keeps its params,
# dvc.lock, output bytes and hashes. tests/test_params.py plants one in every preset.
LATER = {"later": True}


def recorded_dict(obj: Any) -> dict:
    """asdict for a config a stage writes into its output (config.json, an artifact's header): every
    field but the LATER ones still at their default."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("later") and value == (f.default if f.default is not dataclasses.MISSING
                                                  else f.default_factory()):
            continue
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return recorded_dict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
        raise ConfigError(f"override {shown(text)}: expected SECTION.KEY=VALUE")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {shown(text)}: the value is not valid YAML: {err}") from err
    node: dict = {}
    parts = key.strip().split(".")
    cursor = node
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


# The largest params file pgolf reads: a full params.yaml is about 8 KB.
MAX_PARAMS_BYTES = 1 << 20


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is too large for a params file (at most {MAX_PARAMS_BYTES:,})")
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from err
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
            raise ValueError(f"{name} {shown(value)} must be a finite number")
        if not all(_BOUNDS[kind][1](value, bound) for kind, bound in bounds.items()):
            limits = " and ".join(f"{_BOUNDS[kind][0]} {bound:,}" if isinstance(bound, int) and abs(bound) >= 10**6
                                  else f"{_BOUNDS[kind][0]} {bound:g}" for kind, bound in bounds.items())
            raise ValueError(f"{name} {shown(value)} must be {limits}")
