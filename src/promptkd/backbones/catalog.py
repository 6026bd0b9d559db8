"""Which models and pretrained tags exist, and which of them load offline from the local caches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip

from promptkd.backbones.registry import register_builtin_configs

_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class CatalogEntry:
    model: str
    tag: str | None
    offline: bool
    quick_gelu: bool
    source: str  # "hf-hub:<repo>", "url", "promptkd" (tiny configs, random weights), "config"


def _hf_cached(repo_and_file: str, cache_dir: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return False
    repo, filename = (
        os.path.split(repo_and_file.rstrip("/")) if not repo_and_file.endswith("/") else (repo_and_file.rstrip("/"), "")
    )
    names = [filename] if filename else list(_HF_FILES)
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def _url_cached(url: str, cache_dir: str | None) -> bool:
    root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
    return bool(url) and (root / os.path.basename(url)).is_file()


def is_cached(tag_cfg: dict, cache_dir: str | None = None) -> bool:
    """True when a pretrained tag's weights are already in the Hugging Face or open_clip URL cache."""
    hf = tag_cfg.get("hf_hub", "")
    return _hf_cached(hf, cache_dir) if hf else _url_cached(tag_cfg.get("url", ""), cache_dir)


def catalog(name_filter: str = "", cache_dir: str | None = None) -> list[CatalogEntry]:
    """Every (model, tag) pair open_clip knows, plus promptkd's tiny configs, with offline availability."""
    register_builtin_configs()
    entries: list[CatalogEntry] = []
    tagged = set()
    for model, tag in open_clip.list_pretrained():
        if name_filter.lower() not in model.lower():
            continue
        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
        hf = cfg.get("hf_hub", "")
        offline = is_cached(cfg, cache_dir)
        entries.append(
            CatalogEntry(model, tag, offline, bool(cfg.get("quick_gelu")), f"hf-hub:{hf.rstrip('/')}" if hf else "url")
        )
        tagged.add(model)
    for model in open_clip.list_models():
        if model in tagged or name_filter.lower() not in model.lower():
            continue
        own = model.startswith("pkd-")
        cfg = open_clip.get_model_config(model) or {}
        entries.append(CatalogEntry(model, None, True, bool(cfg.get("quick_gelu")), "promptkd" if own else "config"))
    return entries
