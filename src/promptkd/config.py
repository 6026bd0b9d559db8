"""Typed configs: dataclasses filled from YAML presets and ``key=value`` overrides, strictly.

Every unknown key is an error with a "did you mean" (a silently ignored key is how reference configs carried
dead settings); values are converted to the field's declared type, so ``lr=0.01`` from the command line is a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from promptkd.errors import PromptKDError

T = TypeVar("T")

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(PromptKDError, ValueError):
    """A config key or value that does not exist or does not fit its type."""


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to a dataclass field's type (str 'true' -> bool, '0.1' -> float, lists...)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} fits none of {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{where}: unknown key {key!r}.{_did_you_mean(key, list(types_))} Valid keys: {', '.join(sorted(types_))}."
        )
    kwargs = {k: _convert(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-ready data."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (YAML-parsed values) to nested dict ``data``."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.002)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error}).") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level.")
    return data


def list_presets(method: str) -> list[str]:
    folder = PRESETS_DIR / method
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_preset(method: str, preset: str) -> dict[str, Any]:
    """A method's YAML preset by name (``configs/<method>/<preset>.yaml``) or by path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_yaml(path)
    options = list_presets(method)
    if preset not in options:
        raise ConfigError(
            f"unknown preset {preset!r} for method {method!r}.{_did_you_mean(preset, options)} "
            f"Presets: {', '.join(options) or 'none'}."
        )
    return load_yaml(PRESETS_DIR / method / f"{preset}.yaml")


def config_hash(data: Any) -> str:
    """Stable short hash of a resolved config (sorted JSON)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
