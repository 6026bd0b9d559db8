"""promptkd's own open_clip model configs (tiny test models, the embedded world's CLIPs), made visible to open_clip."""

from __future__ import annotations

from pathlib import Path

import open_clip

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_builtin_configs() -> None:
    """Make promptkd's tiny model configs visible to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True
