"""One training run from a resolved config: data -> backbone -> method -> engine -> evaluation -> result files.

The run folder holds ``config.yaml`` (the resolved config), ``train.log``, ``metrics.jsonl`` / ``epochs.jsonl``,
the checkpoint ``prompts.safetensors`` + ``prompts.json``, ``resume.pt`` while training, and one result JSON per
evaluation (with ``results.jsonl`` as the run table). The test split is evaluated once, at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from promptkd.checkpoints import atomic_write_text
from promptkd.config import AT_LEAST_ONE, SEED, ConfigError, config_hash
from promptkd.engine.config import TrainConfig, stable_dict
from promptkd.engine.distributed import DistInfo, init_distributed
from promptkd.engine.trainer import Trainer, TrainResult, predict_logits
from promptkd.errors import PromptKDError
from promptkd.methods.presets import resolve_layered

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Everything that defines a training run (what `promptkd train` resolves and writes to config.yaml)."""

    method: str = "coop"
    dataset: str = "shapes"
    data_root: str | None = None
    classnames: str | None = None  # your data: class-name file, matched to class folders by name
    shots: int = 16
    subsample: Literal["all", "base"] = "base"  # classes trained on; base runs are also scored on the new half
    seed: int = 1
    # The run's randomness in three parts, each settable alone to measure its share of the variance: the few-shot
    # sample (split_seed), the method's initialisation (init_seed), both defaulting to ``seed``; the data order,
    # augmentation and in-training randomness come from ``train.seed``.
    split_seed: int | None = field(default=None, metadata={"rule": SEED})
    init_seed: int | None = field(default=None, metadata={"rule": SEED})
    # Train this many initialisations (init seeds s, s + 1000, ...; same split and data order), keep the one whose
    # last epoch has the lowest training loss and test only that one: no test or validation label is read.
    restarts: int = field(default=1, metadata={"rule": AT_LEAST_ONE})
    model: str = "pkd-world-student"
    pretrained: str | None = None
    quick_gelu: bool | None = None
    device: str = "auto"
    out: str = "runs/train"
    strict_shots: bool = True  # K larger than the smallest class is an error (the reference silently takes all)
    skip_bad: bool = False
    evaluate: bool = True
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.seed is None:  # one seed moves the order too, unless train.seed is set apart
            self.train.seed = self.seed


def resolve_run_config(method: str, preset: str | None, overrides: list[str], base: dict[str, Any]) -> RunConfig:
    """Preset (method + train sections) < command-line values < ``--set key=value`` overrides; all strict."""
    from promptkd.methods import get_method

    method_cls = get_method(method)
    if method_cls.task != "classification":
        raise ConfigError(
            f"method {method_cls.name!r} pre-trains a whole CLIP on captioned images; run it with `promptkd pretrain`."
        )
    return resolve_layered(
        RunConfig, method_cls.name, preset, overrides, {**base, "method": method_cls.name}, "run config"
    )


def attach_run_log(out: Path, enabled: bool = True) -> logging.Handler | None:
    """Copy the package's log records to ``<out>/train.log`` while a run lasts (the main process only); give the
    returned handler to :func:`detach_run_log` when the run ends."""
    if not enabled:
        return None
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("promptkd").addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("promptkd").removeHandler(handler)
        handler.close()


@dataclass
class RunOutcome:
    out: Path
    train: TrainResult
    results: list[dict[str, Any]]


RESTART_STRIDE = 1000  # init seeds of a run's restarts: s, s + 1000, ... (never another protocol seed's)


def run_with_restarts(config: RunConfig, info: DistInfo | None = None) -> RunOutcome:
    """``restarts`` trainings that differ only in their initialisation, each in ``<out>/restarts/init_<seed>`` (resumed
    or skipped like any run); the one with the lowest last-epoch training loss is trained again in ``<out>`` and
    tested there (the choice and every loss in ``<out>/restarts.json``): a failed start is left behind without
    looking at a test label. Costs restarts + 1 trainings."""
    first = config.seed if config.init_seed is None else config.init_seed
    losses: dict[int, float] = {}
    for k in range(config.restarts):
        seed = first + k * RESTART_STRIDE
        trial = dataclasses.replace(
            config, restarts=1, init_seed=seed, evaluate=False, out=str(Path(config.out) / "restarts" / f"init_{seed}")
        )
        losses[seed] = float(run_training(trial, info=info).train.history[-1]["loss"])
    chosen = min(losses, key=lambda seed: (losses[seed], seed))
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank keeps rank 0's choice
        box = [chosen]
        torch.distributed.broadcast_object_list(box, src=0)
        chosen = box[0]
    logger.info("restarts: last-epoch losses %s; init seed %d kept", losses, chosen)
    outcome = run_training(dataclasses.replace(config, init_seed=chosen), info=info, restart_chosen=True)
    if info is None or info.is_main:
        record = {"criterion": "last-epoch training loss", "losses": {str(k): v for k, v in losses.items()}}
        atomic_write_text(Path(config.out) / "restarts.json", json.dumps({**record, "chosen": chosen}, indent=2))
    return outcome


def run_training(config: RunConfig, *, info: DistInfo | None = None, restart_chosen: bool = False) -> RunOutcome:
    """Train and evaluate one (method, dataset, shots, seed) run (of its ``restarts``, the one with the lowest loss)."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import few_shot_splits, subsample_classes
    from promptkd.data.transforms import build_transform, train_transform
    from promptkd.evaluation.metrics import classification_metrics, harmonic_mean
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from
    from promptkd.paths import writable_folder
    from promptkd.results import make_result, write_result

    given_info = info  # restarts hand it on unchanged: each run then picks its own device
    if info is None:
        info, device = init_distributed(config.device)
    else:
        device = torch.device("cpu")
    method_cls = get_method(config.method)
    method_config = config_from(method_cls, config.method_config)
    weights = run_weights(config.model, config.pretrained)  # cheap checks before any data is read
    if config.restarts > 1 and not restart_chosen:
        return run_with_restarts(config, given_info)
    if config.shots < 0:
        raise ConfigError(f"--shots must be 0 (every labelled image) or a positive K, got {config.shots}.")
    out = writable_folder(config.out) if info.is_main else Path(config.out)
    resolved = stable_dict(config)  # split_seed / init_seed appear only when set: earlier runs hash the same
    split_seed = config.seed if config.split_seed is None else config.split_seed
    init_seed = config.seed if config.init_seed is None else config.init_seed
    handler = attach_run_log(out, info.is_main)
    try:
        splits = resolve_dataset(config.dataset, config.data_root, classnames=config.classnames)
        if config.shots > 0:
            splits = few_shot_splits(
                splits, config.shots, split_seed, cache_dir=out / "split_fewshot", strict=config.strict_shots
            )
        train_splits = subsample_classes(splits, config.subsample)
        backbone = load_backbone(
            config.model,
            weights,
            quick_gelu=config.quick_gelu,
            device=device,
            precision=config.train.precision,
        )
        torch.manual_seed(init_seed)
        method = method_cls(backbone, train_splits.classnames, method_config)
        if info.is_main:  # once the method accepted its settings (e.g. attributes that fit the context): a refused
            # run leaves an earlier run's config in the folder as it was
            atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        train_tf = train_transform(backbone.preprocess, scale=config.train.crop_scale)
        eval_tf = build_transform(backbone.preprocess, train=False)
        train_set = ImageDataset(train_splits.train, train_tf, skip_bad=config.skip_bad)
        val_set = ImageDataset(train_splits.val, eval_tf, skip_bad=config.skip_bad) if train_splits.val else None
        trainer = Trainer(method, config.train, out, device=device, info=info, run_config=resolved)
        outcome = trainer.fit(train_set, val_set)
        results: list[dict[str, Any]] = []
        if config.evaluate:
            # A base run is scored on each half among its own classes (the papers' base-to-novel) and, beside it,
            # on all classes at once (what a deployed model faces); "all" runs on all classes only.
            halves = ["base", "new", "all"] if config.subsample == "base" else ["all"]
            accs = {}
            for half in halves:
                part = subsample_classes(splits, half) if half != "all" else splits
                try:
                    method.set_classnames(part.classnames)
                except (PromptKDError, ValueError) as error:  # class-bound parts (CSC context, Tip-Adapter cache)
                    logger.warning("%s half not evaluated: %s", half, error)
                    continue
                test_set = ImageDataset(part.test, eval_tf, skip_bad=config.skip_bad)
                logits, labels = predict_logits(
                    method,
                    test_set,
                    precision=config.train.precision,
                    device=device,
                    info=info,
                    progress=config.train.progress,
                )
                metrics = classification_metrics(logits, labels)
                accs[half] = metrics["acc1"]
                results.append(
                    make_result(
                        dataset=config.dataset,
                        task="classification",
                        metrics=metrics,
                        method=method.name,
                        backbone=backbone,
                        subsample=half,
                        protocol="base2new" if config.subsample == "base" else None,
                        seed=config.seed,
                        num_shots=config.shots or None,
                        num_classes=len(part.classnames),
                        num_samples=len(labels),
                        config=resolved,
                        skipped_images=getattr(test_set, "skipped", []),
                        small_images=[*getattr(test_set, "small", []), *getattr(train_set, "small", [])],
                        selection=outcome.selection,
                        extra={"train_seconds": outcome.seconds, "train_images_per_second": outcome.images_per_second},
                    )
                )
            if {"base", "new"} <= set(accs):
                logger.info(
                    "base %.2f novel %.2f HM %.2f",
                    100 * accs["base"],
                    100 * accs["new"],
                    100 * harmonic_mean(accs["base"], accs["new"]),
                )
            if info.is_main:
                for result in results:
                    write_result(result, out)
        return RunOutcome(out, outcome, results)
    finally:
        detach_run_log(handler)


def run_hash(config: RunConfig) -> str:
    return config_hash(stable_dict(config))


class RunError(PromptKDError, RuntimeError):
    pass
