"""Pre-trained weights of the embedded world's CLIPs, shipped inside the package (made by `promptkd pretrain`).

Each ``<model>.safetensors`` (fp16) has a record ``<model>.json`` beside it: the open_clip config it was trained
with, the SHA-256 of the weight file, the world version it was pre-trained on and how it was pre-trained
(``scripts/pretrain_world.py`` writes both). A weight file whose hash does not match its record, or a record made
for another architecture or for a world whose pre-training corpus differs from this code's, is refused: a stale or
edited file would otherwise load silently and every number measured on the world would drift. World versions that
changed only test-only sets (``PRETRAIN_VERSION`` to ``WORLD_VERSION``) keep the weights valid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from promptkd.errors import PromptKDError

WEIGHTS_DIR = Path(__file__).parent / "weights"
RECORD_FORMAT = "promptkd-shipped-weights"


logger = logging.getLogger(__name__)
SHIPPED_TAG = "shipped"  # `pretrained` value naming the weights promptkd ships for the embedded world's models


class ShippedWeightsError(PromptKDError, ValueError):
    """A shipped weight file that does not match its record (edited, truncated or from another release)."""


def shipped_weights(model_name: str) -> str | None:
    """Path of the shipped weight file for a world model, or None when the package carries none.

    ``load_backbone(name, "shipped")`` loads them and records ``pretrained="shipped"`` (portable across installs).
    """
    path = WEIGHTS_DIR / f"{model_name}.safetensors"
    return str(path) if path.is_file() else None


RANDOM = "random"  # `pretrained` value asking for random initialisation on purpose


class WeightsNotGivenError(PromptKDError, ValueError):
    """A run names a model but no weights, and the model has no shipped weights."""


def shipped_record(weights: str | Path) -> dict[str, Any]:
    """The record beside a shipped weight file (raises :class:`ShippedWeightsError` when it is missing or broken)."""
    record_path = Path(weights).with_suffix(".json")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShippedWeightsError(
            f"{weights}: shipped weights without their record {record_path.name}; reinstall promptkd, or rebuild "
            "both with `python scripts/pretrain_world.py`."
        ) from None
    except (OSError, ValueError) as error:
        raise ShippedWeightsError(f"{record_path}: unreadable record of shipped weights ({error}).") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or "sha256" not in record:
        raise ShippedWeightsError(f"{record_path}: not a record of shipped weights (format {RECORD_FORMAT!r}).")
    return record


def verify_shipped(weights: str | Path, model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a shipped weight file against its record: hash, architecture and pre-training world. Returns the record."""
    from promptkd.backbones.files import sha256_of
    from promptkd.data.world.build import PRETRAIN_VERSION, WORLD_VERSION

    record = shipped_record(weights)
    digest = sha256_of(weights)
    fix = "reinstall promptkd, or rebuild the weights and their record with `python scripts/pretrain_world.py`"
    if digest != record["sha256"]:
        raise ShippedWeightsError(
            f"{weights}: SHA-256 {digest[:16]}... does not match its record ({record['sha256'][:16]}...): the file was "
            f"changed after it was made; {fix}."
        )
    recorded_cfg = record.get("model_cfg")
    if model_config is not None and recorded_cfg is not None:
        differ = sorted(k for k in set(model_config) | set(recorded_cfg) if model_config.get(k) != recorded_cfg.get(k))
        if differ:
            raise ShippedWeightsError(
                f"{weights}: made for another architecture than the model config (differs in {', '.join(differ)}); "
                f"{fix}."
            )
    version = record.get("world_version")
    if not isinstance(version, int) or not PRETRAIN_VERSION <= version <= WORLD_VERSION:
        raise ShippedWeightsError(
            f"{weights}: pre-trained on world version {version}, but this promptkd renders world version "
            f"{WORLD_VERSION}, whose pre-training corpus dates from version {PRETRAIN_VERSION}; {fix}."
        )
    return record
