"""Typed configs: strict keys with suggestions, type conversion, overrides, presets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from promptkd.config import ConfigError, apply_overrides, config_hash, from_dict, load_preset
from promptkd.engine.config import TrainConfig
from promptkd.methods import UnknownMethodError, get_method


@dataclass
class Inner:
    depth: int = 9
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    lr: float = 0.1
    flag: bool = False
    mode: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_values_are_converted_to_declared_types():
    cfg = from_dict(Outer, {"lr": "0.5", "flag": "true", "mode": "null", "inner": {"depth": "3", "names": "a,b"}})
    assert cfg == Outer(lr=0.5, flag=True, mode=None, inner=Inner(depth=3, names=["a", "b"]))


def test_unknown_keys_and_bad_values_are_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'\. Did you mean 'lr'"):
        from_dict(Outer, {"lrr": 1})
    with pytest.raises(ConfigError, match=r"config\.inner: .*unknown key 'dept'.*Did you mean 'depth'"):
        from_dict(Outer, {"inner": {"dept": 1}})
    with pytest.raises(ConfigError, match=r"config\.flag: expected true/false"):
        from_dict(Outer, {"flag": "maybe"})
    with pytest.raises(ConfigError, match=r"'adam' is not one of 'sgd', 'adamw'"):
        from_dict(TrainConfig, {"optimizer": "adam"})
    with pytest.raises(ConfigError, match="lr must be positive"):
        from_dict(TrainConfig, {"lr": 0})


def test_overrides_parse_yaml_values_into_nested_keys():
    data = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.002", "train.betas=[0.9, 0.98]", "seed=3"])
    assert data == {"train": {"lr": 0.002, "betas": [0.9, 0.98]}, "seed": 3}
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, ["train.lr"])


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_unknown_preset_and_method_suggest_names():
    with pytest.raises(ConfigError, match="unknown preset 'nope' for method 'coop'"):
        load_preset("coop", "nope")
    with pytest.raises(UnknownMethodError, match=r"unknown method 'copo'\. Did you mean 'coop'"):
        get_method("copo")
