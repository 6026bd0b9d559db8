"""Methods, one module each, found by name.

Built-in methods are listed here by module, so ``get_method("coop")`` works without importing anything first
(Dassl registries only knew a trainer after its module had been imported). Third-party methods register with
``@register_method``.
"""

from __future__ import annotations

import difflib
import importlib

from promptkd.errors import PromptKDError
from promptkd.methods.base import Batch, Method, MethodConfig, StepOutput

BUILTIN_METHODS: dict[str, str] = {
    "zeroshot": "promptkd.methods.zeroshot",
    "coop": "promptkd.methods.coop",
    "cocoop": "promptkd.methods.cocoop",
    "vpt": "promptkd.methods.vpt",
    "ivlp": "promptkd.methods.ivlp",
    "maple": "promptkd.methods.maple",
    "promptsrc": "promptkd.methods.promptsrc",
    "vp": "promptkd.methods.visual_prompting",
    "clip_adapter": "promptkd.methods.clip_adapter",
    "tip_adapter": "promptkd.methods.tip_adapter",
    "tip_adapter_f": "promptkd.methods.tip_adapter",
    "promptkd": "promptkd.methods.promptkd",
    "promptkd_timm": "promptkd.methods.promptkd_timm",
    "dpc": "promptkd.methods.dpc",
    "contrastive": "promptkd.methods.contrastive",
}

_REGISTRY: dict[str, type[Method]] = {}


class UnknownMethodError(PromptKDError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method findable by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(set(BUILTIN_METHODS) | set(_REGISTRY))


def get_method(name: str) -> type[Method]:
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY and key in BUILTIN_METHODS:
        try:
            importlib.import_module(BUILTIN_METHODS[key])
        except ModuleNotFoundError as error:
            if error.name == BUILTIN_METHODS[key]:
                raise UnknownMethodError(f"method {name!r} is not available in this version") from error
            raise
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list_methods(), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Methods: {', '.join(list_methods())}.")
    return _REGISTRY[key]


__all__ = [
    "BUILTIN_METHODS",
    "Batch",
    "Method",
    "MethodConfig",
    "StepOutput",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "register_method",
]
