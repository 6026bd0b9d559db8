"""One pre-training run (what ``promptkd pretrain`` does), through the shared engine.

captioned images (a caption file read lazily, or WebDataset shards streamed) → a CLIP (random weights unless
``pretrained`` names some; a ``local-dir:`` model starts from its folder's weights) → the ``contrastive`` method
(the objective) → the engine's :class:`Trainer` (data order, precision, checkpoints, exact resume after a kill, DDP
under torchrun, logs) → the model as an open_clip
``local-dir`` folder in ``<out>`` (``--model local-dir:<out>``) with ``pretrain_history.json`` (losses, zero-shot
accuracy per evaluated epoch, timings) and ``pretrain_curve.png``.

The run folder also holds ``config.yaml``, ``train.log``, ``metrics.jsonl`` (the loss every ``log_every`` steps),
``epochs.jsonl`` (epoch loss and zero-shot metrics) and ``resume.pt``: run the same command again after a kill and it
continues where it stopped, ending with the weights an uninterrupted run has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from promptkd.checkpoints import atomic_write_text
from promptkd.config import ConfigError, to_dict
from promptkd.engine.config import TrainConfig
from promptkd.errors import PromptKDError

__all__ = [
    "CURVE_NAME",
    "HISTORY_NAME",
    "PretrainOutcome",
    "PretrainRunConfig",
    "plot_history",
    "resolve_pretrain_config",
    "run_pretraining",
]

logger = logging.getLogger(__name__)

HISTORY_NAME = "pretrain_history.json"
CURVE_NAME = "pretrain_curve.png"
METHOD = "contrastive"
#: The files of a finished model in a run folder (an open_clip ``local-dir`` folder).
MODEL_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


@dataclass
class PretrainRunConfig:
    """Everything that defines a pre-training run (written to ``<out>/config.yaml``)."""

    data: str = ""  # world (its cache), a world root, captions.jsonl, COCO .json, or shards ('d/{000..009}.tar')
    model: str = "pkd-world-student"  # open_clip model name (random weights) or local-dir:<folder> (its weights)
    pretrained: str = "random"  # random (pre-training from scratch, the default), or a tag / weight file to continue
    device: str = "auto"
    out: str = "runs/pretrain"
    eval: Literal["auto", "world", "none"] = "auto"  # zero-shot on the world's compositions; auto: world data only
    eval_every: int = 5  # epochs between zero-shot evaluations (and after the last); 0: only after the last
    eval_per_class: int = 10  # rendered images per class and style
    lanes: int = 0  # shards: lanes of the stream (0: one per shard)
    epoch_samples: int = 0  # shards: samples per epoch (0: every image once)
    skip_bad: bool = False  # skip (and count) unreadable images and captionless shard samples
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.seed is None:  # pre-training has no run seed: train.seed is the run's only one
            self.train.seed = 1
        if self.eval_every < 0 or self.eval_per_class < 1:
            raise ValueError("eval_every must be >= 0 and eval_per_class >= 1")


def resolve_pretrain_config(preset: str | None, overrides: list[str], base: dict[str, Any]) -> PretrainRunConfig:
    """Preset (``configs/contrastive/<preset>.yaml``: ``method`` + ``train``) < command-line values < ``--set``."""
    from promptkd.methods.presets import resolve_layered

    return resolve_layered(PretrainRunConfig, METHOD, preset or "default", overrides, base, "pretrain config")


@dataclass
class PretrainOutcome:
    out: Path
    history: dict[str, Any]


def _is_world(path: Path) -> bool:
    from promptkd.data.world import MANIFEST_NAME

    if path.is_dir():
        return (path / MANIFEST_NAME).is_file()
    return path.suffix == ".jsonl" and (path.parent.parent / MANIFEST_NAME).is_file()  # <root>/pretrain/captions


def _train_data(config: PretrainRunConfig, backbone: Any, views: Any) -> tuple[Any, list[str], dict[str, Any]]:
    """(training set, class names, data summary) for a caption file or a shard list."""
    from promptkd.data.captions import (
        CaptionCorpus,
        CaptionDataset,
        is_shard_pattern,
        resolve_caption_file,
        shard_companion,
    )

    if is_shard_pattern(config.data):
        from promptkd.data.shards import ShardLanes
        from promptkd.engine.stream import StreamSource

        lanes = ShardLanes(config.data, lanes=config.lanes, seed=config.train.seed, companions=("txt", "json", "cls"))
        source = StreamSource(
            lanes,
            transform=views,
            seed=config.train.seed,
            epoch_samples=config.epoch_samples,
            skip_bad=config.skip_bad,
            companion=shard_companion(backbone.tokenize),
        )
        return source, [], source.summary()
    corpus = CaptionCorpus.from_file(resolve_caption_file(config.data), skip_bad=config.skip_bad)
    if config.method_config.get("objective", "itl") == "itl" and not corpus.has_labels:
        raise ConfigError(
            f"{corpus.source}: objective 'itl' needs a class label for every image; add 'label' or 'classname' to "
            "each line, or use --objective clip."
        )
    return (
        CaptionDataset(corpus, views, backbone.tokenize, skip_bad=config.skip_bad),
        corpus.classnames,
        corpus.summary(),
    )


def _finished(out: Path) -> bool:
    return (out / HISTORY_NAME).is_file() and all((out / name).is_file() for name in MODEL_FILES)


def run_pretraining(config: PretrainRunConfig, *, overwrite: bool = False) -> PretrainOutcome:
    """Pre-train ``config.model`` on ``config.data``; resumes an unfinished run in ``config.out``."""
    from promptkd.backbones import load_backbone
    from promptkd.data.captions import CaptionViews
    from promptkd.engine.distributed import init_distributed
    from promptkd.engine.run import attach_run_log, detach_run_log
    from promptkd.engine.trainer import RESUME_FILE, Trainer
    from promptkd.methods.base import config_from
    from promptkd.methods.contrastive import ContrastivePretraining
    from promptkd.paths import writable_folder
    from promptkd.pretraining.world_eval import WorldZeroShot, world_zero_shot_sets

    if not config.data:
        raise ConfigError("give the captioned images to pre-train on: --data (a world root, captions file or shards)")
    if config.data == "world":  # the embedded world's corpus, where the demo builds it (built when missing)
        from promptkd.data.world import ensure_world

        config = dataclasses.replace(config, data=str(ensure_world()))
    method_config = config_from(ContrastivePretraining, config.method_config)
    info, device = init_distributed(config.device)
    out = writable_folder(config.out) if info.is_main else Path(config.out)
    if info.is_main and _finished(out):
        if not overwrite:
            raise PromptKDError(
                f"{out} already holds a pre-trained model; pass --overwrite to train it again, or choose another --out."
            )
        for name in (RESUME_FILE, "metrics.jsonl", "epochs.jsonl", HISTORY_NAME):
            (out / name).unlink(missing_ok=True)
    resolved = to_dict(config)
    if info.is_main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    handler = attach_run_log(out, info.is_main)
    try:
        torch.manual_seed(config.train.seed)  # the random initialisation is part of the run's identity
        init = initial_weights(config)
        if init == "random":
            logger.info("%s starts from random weights (pre-training from scratch)", config.model)
        else:
            logger.info("%s starts from the weights of %s", config.model, init)
        backbone = load_backbone(
            config.model,
            None if config.pretrained == "random" else config.pretrained,
            device=device,
            precision=config.train.precision,
        )
        views = CaptionViews(
            backbone.image_size,
            backbone.preprocess.mean,
            backbone.preprocess.std,
            method_config.hflip,
            method_config.translate,
            method_config.zoom,
            method_config.noise,
        )
        train_set, classnames, data_summary = _train_data(config, backbone, views)
        if len(train_set) < config.train.batch_size:
            raise ConfigError(
                f"batch size {config.train.batch_size} exceeds the {len(train_set)} images; lower --batch-size."
            )
        method = ContrastivePretraining(backbone, classnames, method_config)
        data_path = Path(config.data).expanduser()
        if config.eval == "world" or (config.eval == "auto" and _is_world(data_path)):
            method.evaluate = WorldZeroShot(world_zero_shot_sets(backbone.image_size, per_class=config.eval_per_class))
            method.eval_every = config.eval_every or config.train.epochs
        trainer = Trainer(method, config.train, out, device=device, info=info, run_config=resolved)
        result = trainer.fit(train_set)
        history: dict[str, Any] = {}
        if info.is_main:
            history = _history(out, config, resolved, backbone, data_summary, result, train_set)
            atomic_write_text(out / HISTORY_NAME, json.dumps(history, indent=2) + "\n")
            plot_history(history, out / CURVE_NAME)
            logger.info("wrote %s (use it with --model local-dir:%s)", out, out)
        return PretrainOutcome(out, history)
    finally:
        detach_run_log(handler)


def initial_weights(config: PretrainRunConfig) -> str:
    """What the model starts from, as the log and the history say: ``random``, the ``pretrained`` tag or file, or
    for ``--model local-dir:X`` the folder itself (open_clip loads X's weights; a second source is refused)."""
    if config.model.startswith("local-dir:"):
        if config.pretrained not in ("random", ""):
            raise ConfigError(
                f"--pretrained {config.pretrained} with --model {config.model}: a local-dir folder carries its own "
                "weights, and those are loaded; drop --pretrained, or name the architecture instead of the folder."
            )
        return config.model
    return config.pretrained or "random"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _history(
    out: Path,
    config: PretrainRunConfig,
    resolved: dict[str, Any],
    backbone: Any,
    data_summary: dict[str, Any],
    result: Any,
    train_set: Any,
) -> dict[str, Any]:
    """What the run did: settings, losses, zero-shot per evaluated epoch, timings (``pretrain_history.json``)."""
    steps = _read_jsonl(out / "metrics.jsonl")
    epochs = _read_jsonl(out / "epochs.jsonl")
    evaluations = [
        {"epoch": e["epoch"], **{k.split("/", 1)[1]: v for k, v in e.items() if k.startswith("zero_shot/")}}
        for e in epochs
        if any(k.startswith("zero_shot/") for k in e)
    ]
    final = evaluations[-1] if evaluations else {}
    return {
        "config": resolved,
        "init": initial_weights(config),
        "model": backbone.describe(),
        "data": data_summary,
        "train": steps,
        "epochs": epochs,
        "eval": evaluations,
        "steps": steps[-1]["global_step"] if steps else 0,
        "train_seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "final_loss": steps[-1]["loss"] if steps else math.nan,
        "zero_shot": {k: v for k, v in final.items() if k != "epoch"},
        "skipped_images": list(getattr(train_set, "skipped", [])),
        "small_images": len(getattr(train_set, "small", [])),
    }


def plot_history(history: dict[str, Any], path: str | Path) -> Path:
    """Training loss against the step (left) and the summary zero-shot accuracies against the epoch (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    train = history.get("train", [])
    ax_loss.plot([r["global_step"] for r in train], [r["loss"] for r in train], color="C0")
    objective = history.get("config", {}).get("method_config", {}).get("objective", "")
    ax_loss.set(xlabel="step", ylabel=f"{objective} loss".strip(), title="training loss")
    ax_loss.grid(alpha=0.3)
    evaluations = history.get("eval", [])
    keys = [k for k in (evaluations[0] if evaluations else {}) if k != "epoch" and not k.split("/")[0].count("_")]
    keys = keys or [k for k in (evaluations[0] if evaluations else {}) if k != "epoch"][:8]
    for k in keys:
        ax_acc.plot([r["epoch"] for r in evaluations], [r[k] for r in evaluations], marker="o", label=k)
    ax_acc.set(xlabel="epoch", ylabel="zero-shot accuracy (%)", title="zero-shot accuracy")
    ax_acc.grid(alpha=0.3)
    if keys:
        ax_acc.legend(fontsize=8)
    model = history.get("model", {}).get("model_name", "")
    fig.suptitle(f"{model}: {history.get('steps', 0)} steps, {history.get('train_seconds', 0):.0f} s")
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
