"""Pre-train the embedded world's two CLIPs and write the weights promptkd ships, in one command.

    python scripts/pretrain_world.py [--world-root DIR] [--work runs/world_pretrain] [--out WEIGHTS_DIR]
        [--models pkd-world-teacher pkd-world-student]

Builds (or reuses) the world, pre-trains each model from its seed with the ``world`` recipe
(``configs/contrastive/world.yaml``) on the world's captioned corpus (held-out compositions never appear in it),
through the shared engine (``promptkd pretrain``), into ``<work>/<model>`` (an open_clip ``local-dir`` folder with
its history and loss curve; a finished folder made with the same settings and architecture is reused, an
interrupted one resumes), then writes
``<out>/<model>.safetensors`` (fp16, to keep the package small; loaded into fp32) with its record
``<out>/<model>.json``: model config, SHA-256, world version, the pre-training settings and zero-shot summary.
Same machine, same bytes. On a quiet 2-core CPU the teacher takes about 50 minutes and the student 15.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import open_clip

from promptkd.backbones import load_backbone
from promptkd.backbones.files import save_state_dict_safetensors, sha256_of
from promptkd.backbones.weights import RECORD_FORMAT, WEIGHTS_DIR
from promptkd.checkpoints import atomic_write_text
from promptkd.config import to_dict
from promptkd.data.world import WORLD_VERSION, ensure_world
from promptkd.pretraining.run import HISTORY_NAME, resolve_pretrain_config, run_pretraining
from promptkd.pretraining.world_eval import WorldZeroShot, world_zero_shot_sets

#: The recipe of both shipped world CLIPs: configs/contrastive/world.yaml (the weights' record repeats it).
PRESET = "world"
MODELS = ("pkd-world-teacher", "pkd-world-student")
# Settings that do not change the weights (evaluation cadence, logging, paths), ignored when a finished run is reused.
_NO_EFFECT = {"out", "device", "eval", "eval_every", "eval_per_class"}
_NO_EFFECT_TRAIN = {"progress", "log_every", "checkpoint_every", "tensorboard", "num_workers"}


def _effective(config: dict) -> dict:
    kept = {k: v for k, v in config.items() if k not in _NO_EFFECT}
    kept["train"] = {k: v for k, v in kept.get("train", {}).items() if k not in _NO_EFFECT_TRAIN}
    return json.loads(json.dumps(kept))


def _finished(folder: Path, model: str, config: dict) -> bool:
    """A pre-training run in ``folder`` made with these settings and this model's architecture."""
    history, model_file = folder / HISTORY_NAME, folder / "open_clip_config.json"
    if not (history.is_file() and model_file.is_file()):
        return False
    done = json.loads(history.read_text())
    architecture = json.loads(model_file.read_text())["model_cfg"]
    same = _effective(done["config"]) == _effective(config)
    return same and architecture == open_clip.get_model_config(model)


def pretrain_one(model: str, world_root: Path, work: Path, progress: bool) -> Path:
    """Pre-train ``model`` into ``work/model`` through the engine (reused when already done with the same settings;
    an interrupted run resumes)."""
    folder = work / model
    base = {"data": str(world_root), "model": model, "out": str(folder), "eval_every": 7}
    config = resolve_pretrain_config(PRESET, [] if progress else ["train.progress=false"], base)
    load_backbone(model)  # registers promptkd's model configs with open_clip
    if _finished(folder, model, to_dict(config)):
        print(f"{model}: reusing the finished pre-training in {folder}")
        return folder
    run_pretraining(config, overwrite=True)
    return folder


def ship(model: str, folder: Path, out: Path) -> dict:
    """Write the fp16 weights of a pre-trained ``local-dir`` folder and their record into ``out`` (with the zero-shot
    summary of the world's in-memory sets, measured again on the weights as shipped)."""
    backbone = load_backbone(f"local-dir:{folder}")
    history = json.loads((folder / HISTORY_NAME).read_text())
    weights = out / f"{model}.safetensors"
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in backbone.model.state_dict().items()}
    save_state_dict_safetensors(state, weights, metadata={"made_by": "scripts/pretrain_world.py", "model": model})
    final_eval = WorldZeroShot(world_zero_shot_sets(backbone.image_size))(backbone)  # this world version's sets
    record = {
        "format": RECORD_FORMAT,
        "model": model,
        "sha256": sha256_of(weights),
        "dtype": "float16 (loaded into fp32)",
        "world_version": WORLD_VERSION,
        "model_cfg": open_clip.get_model_config(model),
        "preprocess_cfg": {"size": backbone.image_size},
        "pretrain": {"command": "python scripts/pretrain_world.py", "preset": PRESET, **history["config"]},
        "corpus": history.get("data", {}),
        "train_seconds": round(history.get("train_seconds", 0.0)),
        "final_loss": history.get("final_loss"),
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
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
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
