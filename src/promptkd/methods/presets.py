"""Run configs from a method's YAML preset: the one layering rule (preset < command line < ``--set``) every
training command uses, strict at every layer."""

from __future__ import annotations

from typing import Any, TypeVar

from promptkd.config import ConfigError, apply_overrides, from_dict, load_preset
from promptkd.methods import get_method
from promptkd.methods.base import config_from

__all__ = ["resolve_layered"]

T = TypeVar("T")


def resolve_layered(
    cls: type[T], method: str, preset: str | None, overrides: list[str], base: dict[str, Any], where: str
) -> T:
    """Build a run config ``cls``: the method's own training recipe (``train_defaults``, for methods whose reference
    does not train like the engine's Dassl defaults) < a method preset (``method:`` and ``train:`` sections) <
    ``base`` values that are not None < ``--set key=value`` overrides (``method.x`` addresses ``method_config.x``);
    every layer strict."""
    method_cls = get_method(method)
    data: dict[str, Any] = {"method_config": {}, "train": dict(getattr(method_cls, "train_defaults", {}))}
    if preset:
        preset_data = load_preset(method_cls.name, preset)
        unknown = set(preset_data) - {"method", "train"}
        if unknown:
            raise ConfigError(f"preset {preset!r}: unknown sections {sorted(unknown)} (expected 'method', 'train')")
        data["method_config"] = dict(preset_data.get("method") or {})
        data["train"].update(preset_data.get("train") or {})
    for key, value in base.items():
        if value is not None:
            data[key] = value
    renamed = [o.replace("method.", "method_config.", 1) if o.startswith("method.") else o for o in overrides]
    config = from_dict(cls, apply_overrides(data, renamed), where=where)
    config_from(method_cls, config.method_config)  # validate method keys now, before any data or model is loaded
    train = getattr(config, "train", None)
    if method_cls.trains and train is not None and train.epochs < 1:  # 0 epochs would write an untrained model
        raise ConfigError(f"{where}.train.epochs: {method_cls.name} trains, so it needs at least 1 epoch, got 0")
    return config
