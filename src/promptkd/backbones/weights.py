"""Pre-trained weights of the embedded world's CLIPs, shipped inside the package (made by `promptkd pretrain`)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_weights(model_name: str) -> str | None:
    """Path of the shipped weight file for a world model, or None when the package carries none.

    ``load_backbone(name, "shipped")`` loads them and records ``pretrained="shipped"`` (portable across installs).
    """
    path = WEIGHTS_DIR / f"{model_name}.safetensors"
    return str(path) if path.is_file() else None
