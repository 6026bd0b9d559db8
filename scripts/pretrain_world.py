"""Pre-train the embedded world's two CLIPs and write the weights promptkd ships, in one command.

    python scripts/pretrain_world.py [--world-root DIR] [--work runs/world_pretrain] [--out WEIGHTS_DIR]
        [--models pkd-world-teacher pkd-world-student]

Builds (or reuses) the world, pre-trains each model from its seed with :data:`SETTINGS` on the world's captioned
corpus (held-out compositions never appear in it) into ``<work>/<model>`` (an open_clip ``local-dir`` folder with
its history and loss curve; a finished folder made with the same settings and architecture is reused), then writes
``<out>/<model>.safetensors`` (fp16, to keep the package small; loaded into fp32) with its record
``<out>/<model>.json``: model config, SHA-256, world version, the pre-training settings and zero-shot summary.
Same machine, same bytes. On a quiet 2-core CPU the teacher takes about 40 minutes and the student 12.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import open_clip
import torch

from promptkd.backbones import load_backbone
from promptkd.backbones.files import save_state_dict_safetensors, sha256_of
from promptkd.backbones.weights import RECORD_FORMAT, WEIGHTS_DIR
from promptkd.checkpoints import atomic_write_text
from promptkd.data.world import WORLD_VERSION, ensure_world
from promptkd.pretraining import (
    HISTORY_NAME,
    PretrainConfig,
    ZeroShotEvaluator,
    load_caption_dataset,
    pretrain,
    world_zero_shot_sets,
)

_AUGMENT = {"translate": 0.1, "zoom": (0.5, 1.0), "noise": 8.0}
#: How each shipped world CLIP is pre-trained (PretrainConfig fields); the weights' record repeats them.
SETTINGS: dict[str, dict] = {
    "pkd-world-teacher": {"steps": 2400, "seed": 0, **_AUGMENT},
    "pkd-world-student": {"steps": 2400, "seed": 0, **_AUGMENT},
}
# Settings that do not change the weights (evaluation cadence, logging), ignored when a finished run is reused.
_NO_EFFECT = ("eval_every", "log_every", "progress")


def _effective(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k not in _NO_EFFECT}


def _finished(folder: Path, model: str, config: PretrainConfig) -> bool:
    """A pre-training run in ``folder`` made with these settings and this model's architecture."""
    history, model_file = folder / HISTORY_NAME, folder / "open_clip_config.json"
    if not (history.is_file() and model_file.is_file()):
        return False
    done = json.loads(history.read_text())
    architecture = json.loads(model_file.read_text())["model_cfg"]
    return _effective(done["config"]) == _effective(config.to_dict()) and architecture == open_clip.get_model_config(
        model
    )


def pretrain_one(model: str, world_root: Path, work: Path, progress: bool) -> Path:
    """Pre-train ``model`` into ``work/model`` (reused when already done with the same settings)."""
    config = PretrainConfig(**SETTINGS[model], eval_every=400, progress=progress)
    folder = work / model
    load_backbone(model)  # registers promptkd's model configs with open_clip
    if _finished(folder, model, config):
        print(f"{model}: reusing the finished pre-training in {folder}")
        return folder
    torch.manual_seed(config.seed)  # the random initialisation is part of the recipe
    backbone = load_backbone(model)
    dataset = load_caption_dataset(world_root, backbone.image_size)
    evaluate = ZeroShotEvaluator(world_zero_shot_sets(backbone.image_size))
    pretrain(backbone, dataset, config, evaluate=evaluate, out_dir=folder)
    return folder


def ship(model: str, folder: Path, out: Path) -> dict:
    """Write the fp16 weights of a pre-trained ``local-dir`` folder and their record into ``out`` (with the zero-shot
    summary of the world's in-memory sets, measured again on the weights as shipped)."""
    backbone = load_backbone(f"local-dir:{folder}")
    history = json.loads((folder / HISTORY_NAME).read_text())
    weights = out / f"{model}.safetensors"
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in backbone.model.state_dict().items()}
    save_state_dict_safetensors(state, weights, metadata={"made_by": "scripts/pretrain_world.py", "model": model})
    final_eval = ZeroShotEvaluator(world_zero_shot_sets(backbone.image_size))(backbone)  # this world version's sets
    record = {
        "format": RECORD_FORMAT,
        "model": model,
        "sha256": sha256_of(weights),
        "dtype": "float16 (loaded into fp32)",
        "world_version": WORLD_VERSION,
        "model_cfg": open_clip.get_model_config(model),
        "preprocess_cfg": {"size": backbone.image_size},
        "pretrain": {"command": "python scripts/pretrain_world.py", **history["config"]},
        "corpus": history.get("data", {}),
        "train_seconds": round(history.get("train_seconds", 0.0)),
        "final_loss": history["train"][-1]["loss"] if history.get("train") else None,
        "zero_shot": {
            k: round(v, 2) for k, v in final_eval.items() if k.count("/") == 1 and "_" not in k.split("/")[0]
        },
    }
    atomic_write_text(weights.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-root", default=None, help="where the world is built (default: promptkd's cache)")
    parser.add_argument("--work", default="runs/world_pretrain", help="pre-training runs (reused when finished)")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the shipped weights and their records")
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    world_root = ensure_world(args.world_root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        start = time.perf_counter()
        folder = pretrain_one(model, world_root, Path(args.work), not args.no_progress)
        record = ship(model, folder, out)
        summary = ", ".join(f"{k} {v:.1f}" for k, v in record["zero_shot"].items())
        print(f"{model}: {time.perf_counter() - start:.0f} s; zero-shot {summary}; wrote {out / model}.safetensors")


if __name__ == "__main__":
    main()
