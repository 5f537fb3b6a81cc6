"""Typed configs: nested dataclasses, YAML files, dotted ``--set key=value`` overrides.

Each stage declares its config as a tree of dataclasses (for example
``wtours.stages.video.config.VideoPretrainConfig``). :func:`load_config` builds one from the
defaults, then a YAML file, then overrides, and validates every key and type on the way, so a
typo fails at once with a one-line :class:`~wtours.errors.ConfigError` that names the key and
lists the valid ones::

    cfg = load_config(VideoPretrainConfig, "configs/video/tiny.yaml", ["optim.lr=1e-3"])
    to_yaml(cfg)          # the resolved config, as written into every run directory

A YAML file may start from another one with ``base: other.yaml`` (path relative to the file).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from wtours.errors import ConfigError
from wtours.resources import CONFIG_DIR

T = TypeVar("T")



def resolve_config_path(path: str | Path) -> Path:
    """Find a config file by path, or by name under ``configs/`` (``video/tiny`` works)."""
    p = Path(path)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    if p.is_dir():
        raise ConfigError("is a directory, expected a YAML config file", path=p)
    raise ConfigError("config file not found", path=p)


def load_yaml_file(p: Path, what: str = "config") -> Any:
    """``yaml.safe_load`` of file ``p``; a syntax error or an unreadable file is a one-line ConfigError."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(e, 'problem', e)}", path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what}: {e}", path=p) from None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (following ``base:``), with one-line errors."""
    p = resolve_config_path(path)
    data = load_yaml_file(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of keys to values", path=p)
    base = data.pop("base", None)
    if base is not None:
        merged = read_yaml(p.parent / base if not Path(base).is_absolute() else base)
        data = _deep_merge(merged, data)
    return data


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str] | None) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set twice")
        node[parts[-1]] = value
    return tree


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls`` <- YAML file ``path`` <- dotted ``overrides``; validated."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys, wrong types and non-finite numbers
    (``nan``, ``inf`` in a float field) raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    for name, f in fields.items():  # defaults too: `epochs: float = 100` is 100.0, as a YAML round trip gives
        if name not in kwargs and hints[name] is float and isinstance(getattr(cls, name, None), int):
            kwargs[name] = float(getattr(cls, name))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        seq = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan slips through every `<= 0` check
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and empty mappings stay values)."""
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def changed_keys(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Flattened keys whose value differs between two flattened config views (added and removed keys included)."""
    old = old or {}
    return sorted(k for k in set(old) | set(new) if old.get(k, object()) != new.get(k, object()))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
