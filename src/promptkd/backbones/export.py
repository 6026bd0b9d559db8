"""Write a backbone as an open_clip ``local-dir`` folder: weights as safetensors, architecture and preprocessing
(including the QuickGELU decision) in ``open_clip_config.json``, so it reloads offline without pickles."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import open_clip

from promptkd.backbones.files import save_state_dict_safetensors
from promptkd.backbones.loading import TOKENIZER_FILE, Backbone
from promptkd.checkpoints.format import atomic_write_text


def model_config_of(backbone: Backbone) -> dict:
    """The open_clip model config that rebuilds ``backbone``'s architecture."""
    name = backbone.spec.model_name
    cfg = open_clip.get_model_config(name) if not name.startswith(("file:", "local-dir:")) else None
    if cfg is None:
        from promptkd.backbones.architecture import infer_clip_config

        cfg = infer_clip_config(backbone.model.state_dict())
    cfg = dict(cfg)
    cfg["quick_gelu"] = backbone.spec.quick_gelu
    return cfg


def save_local_dir(backbone: Backbone, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict_safetensors(backbone.model.state_dict(), folder / "open_clip_model.safetensors")
    bpe_path = getattr(backbone.tokenizer, "bpe_path", None)
    if bpe_path is None and backbone.spec.model_name.startswith("pkd-world"):
        from promptkd.backbones.vocab import WORLD_BPE_PATH

        bpe_path = WORLD_BPE_PATH
    if bpe_path is not None:  # a non-default vocabulary travels with the weights
        shutil.copyfile(bpe_path, folder / TOKENIZER_FILE)
    config = {"model_cfg": model_config_of(backbone), "preprocess_cfg": asdict(backbone.preprocess)}
    atomic_write_text(folder / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    return folder
