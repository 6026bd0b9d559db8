"""Typed configs: strict keys with suggestions, type conversion, overrides, presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    with pytest.raises(ConfigError, match=r"config\.lr: must be above 0, got 0"):
        from_dict(TrainConfig, {"lr": 0})


def _config_classes() -> list[type]:
    """Every config dataclass a user's --set reaches: run configs, TrainConfig, every method's and TTA method's."""
    from promptkd.distill.run import DistillRunConfig
    from promptkd.engine.run import RunConfig
    from promptkd.methods import get_method, list_methods
    from promptkd.pretraining.run import PretrainRunConfig
    from promptkd.tta.base import BUILTIN_TTA_METHODS, get_tta_method
    from promptkd.tta.run import TTARunConfig

    classes = [RunConfig, DistillRunConfig, PretrainRunConfig, TTARunConfig, TrainConfig]
    classes += [get_method(name).config_class for name in list_methods()]
    classes += [get_tta_method(name).config_class for name in BUILTIN_TTA_METHODS]
    return list(dict.fromkeys(classes))


def test_every_numeric_setting_refuses_nan_inf_and_values_outside_its_rule():
    """One mechanism for all configs: nan/inf never pass a float field, and every rule (FIELD_RULES or a field's own
    metadata) refuses the values just outside it, naming the key; a new field named like a known one is covered."""
    import dataclasses
    import math
    import typing

    from promptkd.config import FIELD_RULES

    checked = 0
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "float" in str(hints[f.name]):
                for bad in ("nan", "inf", "-inf"):
                    with pytest.raises(ConfigError, match=rf"{f.name}: expected a finite number"):
                        from_dict(cls, {f.name: bad})
                    checked += 1
            rule = f.metadata.get("rule") or FIELD_RULES.get(f.name)
            if rule is None:
                continue
            below = rule.low if rule.open_low else rule.low - 1
            outside = [below] + ([rule.high + 1] if rule.high != math.inf else [])
            for value in outside:
                with pytest.raises(ConfigError, match=rf"\.{f.name}: must be"):
                    from_dict(cls, {f.name: value})
                checked += 1
    assert checked > 100


def test_settings_the_issue_found_accepted_silently_are_refused():
    from promptkd.distill.run import resolve_distill_config
    from promptkd.engine.run import resolve_run_config

    with pytest.raises(ConfigError, match="lora_alpha: must be above 0, got 0"):
        resolve_distill_config("world", ["method.lora_alpha=0"], {})
    with pytest.raises(ConfigError, match="train.lr: expected a finite number, got 'nan'"):
        resolve_distill_config("world", ["train.lr=nan"], {})
    with pytest.raises(ConfigError, match="coop trains, so it needs at least 1 epoch"):
        resolve_run_config("coop", "world", ["train.epochs=0"], {})
    assert resolve_run_config("zeroshot", "world", ["train.epochs=0"], {}).train.epochs == 0  # trains nothing


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


@dataclass
class Views:
    augmix: Literal["auto", "on", "off"] = "auto"


def test_on_and_off_overrides_reach_word_choices():
    """`--set method.augmix=on` is read by YAML as True; a setting whose choices are the words gets the word back."""
    data = apply_overrides({}, ["augmix=on"])
    assert data == {"augmix": True} and from_dict(Views, data).augmix == "on"
    assert from_dict(Views, apply_overrides({}, ["augmix=off"])).augmix == "off"
    with pytest.raises(ConfigError, match="is not one of"):
        from_dict(Views, {"augmix": "maybe"})
