"""JSON → frozen dataclasses, guided by their type hints; `key.sub=value` overrides; messages that say where.

The dataclasses ARE the schema (bertino/plumbing/config.py holds bertino's): `build(Type, value, path)` walks the
type hints, so an unknown key lists the valid keys at its level, and a wrong type names the dotted path, the type
expected (in JSON's words: "list of integer, or null") and the value found. Supported hints: dataclasses,
`tuple[X, ...]`, `dict[str, X]`, `Literal[...]`, unions with None, bool, int, float (finite), str.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Sequence

from ..errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=VALUE` into (["a", "b", "c"], value); VALUE is JSON, or a plain string if it isn't JSON."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override {text!r}: expected KEY.SUB=VALUE, e.g. train.max_steps=10 or "
                          f"model.name_or_path=/models/x")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # `model.name_or_path=/models/x`: the shell already ate any quotes
    return keys, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of `data` with each override set; missing or null intermediate objects are created."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a JSON object, found {show(data)}")
    data = copy.deepcopy(data)  # the caller's dict stays as it was
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            if node.get(key) is None:  # e.g. `matryoshka.dims=[...]` when the file says "matryoshka": null
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is {show(node)}, not an object with keys")
        node[keys[-1]] = value
    return data


def build(tp: Any, value: Any, path: str) -> Any:
    """Convert JSON `value` to type `tp` (a type hint), recursing into dataclasses, tuples and dicts."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        container = len(options) == 1 and (dataclasses.is_dataclass(options[0])
                                           or typing.get_origin(options[0]) in (tuple, dict))
        if container and isinstance(value, (dict, list, tuple)):
            return build(options[0], value, path)  # report the precise inner error (e.g. matryoshka.dims[1])
        for option in options:  # `str | bool`: the first that fits
            try:
                return build(option, value, path)
            except ConfigError:
                continue
        raise _type_error(path, tp, value)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{_where(path)}: expected one of {', '.join(map(repr, args))}, found {show(value)}")
    if origin is tuple:  # tuple[X, ...]: JSON lists become tuples
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        return tuple(build(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:  # dict[str, X]
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        return {k: build(args[1], v, _join(path, k)) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(path, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:  # bool is a subclass of int in Python; `"fp16": 1` or `"seed": true` is a mistake
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:  # ints are fine for floats (`"scale": 20`); NaN/inf never are
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)
    raise TypeError(f"the schema uses an unsupported type hint {tp!r} at {path}")  # a bug in the schema


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _type_error(path, cls, value)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"{_where(_join(path, unknown[0]))}: unknown key {unknown[0]!r}; "
                          f"valid keys{' in ' + path if path else ' at the top level'} are: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_where(path)}: missing required key(s) {', '.join(map(repr, missing))}")
    return cls(**{k: build(hints[k], v, _join(path, k)) for k, v in value.items()})


def to_plain(cfg: Any) -> Any:
    """Plain JSON data for a config (or any part of one): dataclasses → dicts, tuples → lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


class DuplicateKey(Exception):
    pass


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return path or "config"


def show(value: Any) -> str:
    return f"{json.dumps(value, default=repr)} ({_json_type(value)})"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, (list, tuple)) else "object" if isinstance(value, dict) else type(value).__name__


def _describe(tp: Any) -> str:
    """A type hint in the words of JSON: `tuple[int, ...] | None` → 'list of integer, or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return ", or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"list of {_describe(args[0])}"
    if origin is dict:
        return f"object of {_describe(args[1])}"
    if dataclasses.is_dataclass(tp):
        return f"object with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    names = {type(None): "null", bool: "boolean (true/false)", int: "integer", float: "finite number",
             str: "string"}
    return names.get(tp, str(tp))


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{_where(path)}: expected {_describe(tp)}, found {show(value)}")


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, found {value!r}")
