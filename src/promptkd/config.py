"""Typed configs: dataclasses filled from YAML presets and ``key=value`` overrides, strictly.

Every unknown key is an error with a "did you mean" (a silently ignored key is how reference configs carried
dead settings); values are converted to the field's declared type, so ``lr=0.01`` from the command line is a float.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
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
        if len(errors) == 1:  # Optional[X]: X's own message says more than "fits none of"
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} fits none of {annotation}")
    if origin is typing.Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads a bare on/off/yes/no/true/false as a bool: give back the word the choices use
            words = [a for a in args if isinstance(a, str) and a.lower() in _BOOL_WORDS[value]]
            if len(words) == 1:
                return words[0]
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
            converted = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is float and not math.isfinite(converted):  # nan/inf never make a setting, anywhere
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return converted
    return value


class Rule(typing.NamedTuple):
    """What a numeric setting may be: ``low``/``high`` bounds (``open_low``: above ``low``, not equal)."""

    low: float
    high: float = math.inf
    open_low: bool = False

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'above' if self.open_low else 'at least'} {self.low:g}"
        return f"{'above' if self.open_low else 'from'} {self.low:g} {'up ' if self.open_low else ''}to {self.high:g}"

    def allows(self, value: float) -> bool:
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high


POSITIVE = Rule(0.0, open_low=True)
NON_NEGATIVE = Rule(0.0)
AT_LEAST_ONE = Rule(1.0)
FRACTION = Rule(0.0, 1.0, open_low=True)
SEED = Rule(0.0, 2.0**32 - 1)

#: The bounds of numeric settings, by field name, in every config dataclass (a learning rate, a batch size or a
#: worker count means the same in each). A field can also carry its own: ``field(metadata={"rule": Rule(...)})``.
#: ``from_dict`` checks them all, so ``--set train.lr=nan`` or ``method.lora_alpha=0`` stops before any work.
FIELD_RULES: dict[str, Rule] = {
    **dict.fromkeys(("lr", "eps", "lora_alpha", "temperature", "kd_weight", "text_memory_mb", "gpa_std"), POSITIVE),
    **dict.fromkeys(
        (
            "batch_size",
            "views",
            "n_views",
            "views_per_class",
            "n_augmented",
            "eval_per_class",
            "eval_text_batch",
            "log_every",
            "steps",
            "reference_size",
            "alpha_steps",
            "beta_steps",
            "reduction",
        ),
        AT_LEAST_ONE,
    ),
    **dict.fromkeys(
        (
            "epochs",  # 0 only for methods that do not train (checked with the method: methods.presets)
            "warmup_epochs",
            "warmup_lr",
            "augment_epochs",
            "weight_decay",
            "grad_clip",
            "max_images",
            "max_per_class",
            "lanes",
            "epoch_samples",
            "checkpoint_every",
            "eval_every",
            "num_workers",
            "workers",
            "shots",
            "teacher_cache_topk",
            "teacher_cache_max_gb",
            "lora_rank",
            "unfreeze_blocks",
            "init_std",
            "noise",
            "translate",
            "image_loss_weight",
            "text_loss_weight",
        ),
        NON_NEGATIVE,
    ),
    "momentum": Rule(0.0, 1.0),
    "selection": FRACTION,
    "min_scale": FRACTION,
    "min_crop_scale": FRACTION,
    "seed": SEED,
    "view_seed": SEED,
}


def _check_rules(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a numeric setting outside its rule (field metadata first, then :data:`FIELD_RULES`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        rule = fields[name].metadata.get("rule") or FIELD_RULES.get(name)
        if rule is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not rule.allows(value):
            raise ConfigError(f"{where}.{name}: must be {rule.describe()}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


#: the words YAML 1.1 turns into True / False
_BOOL_WORDS = {True: ("on", "yes", "true", "y"), False: ("off", "no", "false", "n")}


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = unknown[0]
        hint = getattr(cls, "unknown_key_hints", {}).get(key)
        raise ConfigError(
            f"{where}: unknown key {key!r}.{_did_you_mean(key, list(types_))} Valid keys: {', '.join(sorted(types_))}."
            + (f" {hint}" if hint else "")
        )
    kwargs = {k: _convert(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    _check_rules(cls, kwargs, where)
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
