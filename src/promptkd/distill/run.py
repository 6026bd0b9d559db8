"""One PromptKD distillation run (what ``promptkd distill`` does), from a resolved :class:`DistillRunConfig`.

teacher checkpoint → teacher (strict load, frozen) → stored features of every class of the dataset, written to
``<out>/teacher_features.*`` (or a given file, checked for classes and teacher) → unlabelled images → the engine
trains the student (no label read) → the student's checkpoint ``<out>/prompts.*`` → evaluation when the dataset has
labelled test images: base and novel halves, each scored among its own classes with its rows of the stored features,
and their HM (``protocol: base2new``), or all classes (``protocol: all``, the cross-dataset setting).
Model selection is the last epoch or ``train.select: val`` on the held-out validation split, never the test split
(pitfall 2: the reference picked ``best_val`` with val = base-class test images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from promptkd.checkpoints import atomic_write_text
from promptkd.config import ConfigError, resolve_layered, to_dict
from promptkd.distill.teacher import TeacherError, TeacherFeatures, load_teacher, zero_shot_teacher
from promptkd.engine.config import TrainConfig

__all__ = ["FEATURES_NAME", "DistillOutcome", "DistillRunConfig", "resolve_distill_config", "run_distillation"]

logger = logging.getLogger(__name__)

FEATURES_NAME = "teacher_features"


@dataclass
class DistillRunConfig:
    """Everything that defines a distillation run (written to ``<out>/config.yaml``)."""

    teacher: str | None = None  # promptkd checkpoint of the teacher; None: zero-shot CLIP on teacher_model
    teacher_model: str | None = None
    teacher_pretrained: str | None = None
    teacher_quick_gelu: bool | None = None
    teacher_features: str | None = None  # reuse a stored-features file (checked for classes and teacher)
    student_model: str | None = None
    student_pretrained: str | None = None
    student_quick_gelu: bool | None = None
    dataset: str | None = None
    data_root: str | None = None
    unlabeled_folder: str | None = None
    unlabeled_shards: str | None = None
    classnames: str | None = None  # class-name file for folder/shard sources
    unlabeled_split: Literal["train", "test"] = "train"
    max_per_class: int = 0
    max_images: int = 0
    protocol: Literal["base2new", "all"] = "base2new"
    seed: int = 1
    device: str = "auto"
    out: str = "runs/distill"
    evaluate: bool = True
    skip_bad: bool = False
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve_distill_config(preset: str | None, overrides: list[str], base: dict[str, Any]) -> DistillRunConfig:
    """Preset (``method`` + ``train`` sections) < command-line values < ``--set key=value``; strict."""
    base = dict(base)
    mode = base.pop("mode", None)
    overrides = ([f"method.mode={mode}"] if mode is not None else []) + list(overrides)
    return resolve_layered(DistillRunConfig, "promptkd", preset, overrides, base, "distill config")


@dataclass
class DistillOutcome:
    out: Path
    checkpoint: Path | None
    features: Path
    selection: dict[str, Any]
    results: list[dict[str, Any]]
    history: list[dict[str, Any]]


def _read_classnames(path: str | None) -> list[str]:
    from promptkd.data.userdata import read_classnames

    if not path:
        raise ConfigError("an unlabelled folder or tar shards need --classnames FILE (one class name per line)")
    return read_classnames(path)


def _student_weights(model: str, pretrained: str | None) -> str | None:
    """The given weights, else the package's shipped weights of a world model; None (random) with a warning."""
    if pretrained:
        return pretrained
    from promptkd.backbones.weights import shipped_weights

    shipped = shipped_weights(model)
    if shipped is None:
        logger.warning("student %s has RANDOM weights (no --student-pretrained and no shipped weights)", model)
    return shipped


def run_distillation(config: DistillRunConfig) -> DistillOutcome:
    """Train a PromptKD student as ``config`` says; see the module docstring."""
    from promptkd.backbones import load_backbone
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.data.transforms import build_transform, train_transform
    from promptkd.distill.data import TarImages, from_folder, from_splits, unlabeled_dataset
    from promptkd.engine.distributed import init_distributed
    from promptkd.engine.trainer import Trainer
    from promptkd.evaluation.datasets import resolve_dataset
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    sources = [s for s in (config.dataset, config.unlabeled_folder, config.unlabeled_shards) if s]
    if len(sources) != 1:
        raise ConfigError("give exactly one image source: --dataset, --unlabeled-folder or --unlabeled-shards")
    if not config.student_model:
        raise ConfigError(
            "give the student backbone: --student-model (e.g. ViT-B-16 --student-pretrained openai for the paper, "
            "pkd-world-student for the embedded world)"
        )
    if not config.teacher and not config.teacher_model:
        raise ConfigError("give the teacher: --teacher CHECKPOINT (or --teacher-model alone for zero-shot CLIP)")
    method_cls = get_method("promptkd")
    info, device = init_distributed(config.device)
    out = Path(config.out)
    precision = config.train.precision
    handler = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("promptkd").addHandler(handler)
    try:
        # --- classes and unlabelled images -------------------------------------------------------------------------
        splits = None
        mode = str(config.method_config.get("mode", "transductive"))
        if config.dataset:
            splits = resolve_dataset(config.dataset, config.data_root)
            all_classes = list(splits.classnames)
            source = from_splits(
                splits,
                mode=mode,  # type: ignore[arg-type]
                split=config.unlabeled_split,
                max_per_class=config.max_per_class,
                max_images=config.max_images,
                seed=config.seed,
            )
        else:
            if config.max_per_class:
                raise ConfigError("--max-per-class needs labels to count; folders and shards take --max-images only")
            all_classes = _read_classnames(config.classnames)
            if mode == "inductive":
                raise ConfigError("inductive mode selects base-class images by label; it needs --dataset")
            source = None
            if config.unlabeled_folder:
                source = from_folder(
                    config.unlabeled_folder, all_classes, max_images=config.max_images, seed=config.seed
                )
        # --- teacher and its stored features (once, after its prompts are loaded) ------------------------------------
        if config.teacher:
            teacher = load_teacher(
                config.teacher,
                model=config.teacher_model,
                pretrained=config.teacher_pretrained,
                quick_gelu=config.teacher_quick_gelu,
                classnames=all_classes,
                device=device,
                precision=precision,
            )
        else:
            teacher_backbone = load_backbone(
                config.teacher_model,
                config.teacher_pretrained,
                quick_gelu=config.teacher_quick_gelu,
                device=device,
                precision=precision,
            )
            teacher = zero_shot_teacher(teacher_backbone, [splits.template] if splits is not None else None)
        features_path = out / f"{FEATURES_NAME}.safetensors"
        stored: TeacherFeatures | None = None
        if config.teacher_features:
            stored = TeacherFeatures.load(config.teacher_features)
            stored.check(classnames=all_classes, teacher=teacher.identity)
            logger.info("reusing stored teacher features %s", config.teacher_features)
        elif features_path.is_file():  # a resumed run: reuse the folder's file when it still fits
            try:
                candidate = TeacherFeatures.load(features_path)
                candidate.check(classnames=all_classes, teacher=teacher.identity)
                stored = candidate
                logger.info("reusing the run folder's teacher features %s", features_path)
            except TeacherError as error:
                logger.info("recomputing teacher features (%s)", error)
        if stored is None:
            stored = teacher.compute_features(all_classes)
        if info.is_main:
            stored.save(features_path)
        # --- student ---------------------------------------------------------------------------------------------
        student = load_backbone(
            config.student_model,
            _student_weights(config.student_model, config.student_pretrained),
            quick_gelu=config.student_quick_gelu,
            device=device,
            precision=precision,
        )
        method_config_data = dict(config.method_config)
        method_config_data.update(
            teacher_checkpoint=str(config.teacher or ""),
            teacher_model=str(config.teacher_model or ""),
            teacher_pretrained=str(config.teacher_pretrained or ""),
            teacher_features=str(features_path),
        )
        method_config = config_from(method_cls, method_config_data)
        train_tf = train_transform(student.preprocess, scale=config.train.crop_scale)
        eval_tf = build_transform(student.preprocess, train=False)
        if source is not None:
            train_set = unlabeled_dataset(source, train_tf, skip_bad=config.skip_bad)
            classes = source.classnames
            data_summary = source.summary()
        else:
            train_set = TarImages(config.unlabeled_shards, train_tf, max_images=config.max_images, seed=config.seed)
            classes = all_classes
            data_summary = {
                "images": len(train_set),
                "classes": len(classes),
                "mode": mode,
                "source": f"tar shards {config.unlabeled_shards}",
            }
        logger.info("unlabelled images: %s", data_summary)
        torch.manual_seed(config.seed)
        method = method_cls(student, classes, method_config, features=stored, teacher=teacher)
        val_set = None
        if splits is not None and config.train.select == "val" and splits.val:
            part = subsample_classes(splits, "base") if mode == "inductive" else splits
            val_set = ImageDataset(part.val, eval_tf, skip_bad=config.skip_bad)  # held-out, labelled: selection only
        resolved = to_dict(config)
        resolved["method_config"] = to_dict(method_config)
        resolved["unlabeled"] = data_summary
        resolved["teacher_identity"] = teacher.identity
        if info.is_main:
            atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        trainer = Trainer(method, config.train, out, device=device, info=info, run_config=resolved)
        outcome = trainer.fit(train_set, val_set)
        method.detach_teacher()  # inference never needs it
        results = _evaluate(config, method, student, splits, mode, eval_tf, resolved, outcome, teacher.identity, info)
        return DistillOutcome(out, outcome.checkpoint, features_path, outcome.selection, results, outcome.history)
    finally:
        if handler is not None:
            logging.getLogger("promptkd").removeHandler(handler)
            handler.close()


def _evaluate(
    config: DistillRunConfig,
    method: Any,
    student: Any,
    splits: Any,
    mode: str,
    eval_tf: Any,
    resolved: dict[str, Any],
    outcome: Any,
    teacher_identity: dict[str, Any],
    info: Any,
) -> list[dict[str, Any]]:
    """Base and novel halves (or all classes) of the test split, each among its own classes; result JSONs."""
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.engine.trainer import predict_logits
    from promptkd.evaluation.metrics import classification_metrics, harmonic_mean
    from promptkd.results import make_result, write_result

    if not config.evaluate or splits is None or not splits.test:
        if config.evaluate:
            logger.info("no labelled test split: nothing evaluated")
        return []
    trained_on = list(method.classnames)
    halves = ["base", "new", "all"] if config.protocol == "base2new" else ["all"]
    results: list[dict[str, Any]] = []
    accs: dict[str, float] = {}
    for half in halves:
        part = subsample_classes(splits, half) if half != "all" else splits
        if not part.test:
            continue
        method.set_classnames(part.classnames)  # its rows of the stored features
        test_set = ImageDataset(part.test, eval_tf, skip_bad=config.skip_bad)
        logits, labels = predict_logits(
            method, test_set, precision=config.train.precision, device=method.all_text_features.device, info=info
        )
        metrics = classification_metrics(logits, labels)
        accs[half] = metrics["acc1"]
        results.append(
            make_result(
                dataset=config.dataset,
                task="classification",
                metrics=metrics,
                method="promptkd",
                backbone=student,
                protocol="base2new" if config.protocol == "base2new" else "cross_dataset",
                subsample=half,
                seed=config.seed,
                num_classes=len(part.classnames),
                num_samples=len(labels),
                config=resolved,
                skipped_images=getattr(test_set, "skipped", []),
                selection=outcome.selection,
                extra={
                    "mode": mode,
                    "transductive": mode == "transductive",
                    "unlabeled_split": config.unlabeled_split,
                    "teacher": teacher_identity,
                    "train_seconds": outcome.seconds,
                    "train_images_per_second": outcome.images_per_second,
                },
            )
        )
    if {"base", "new"} <= set(accs):
        hm = harmonic_mean(accs["base"], accs["new"])
        logger.info("base %.2f novel %.2f HM %.2f", 100 * accs["base"], 100 * accs["new"], 100 * hm)
        for result in results:
            if result["subsample"] != "all":
                result["hm"] = hm
    method.set_classnames(trained_on)
    if info.is_main:
        for result in results:
            write_result(result, config.out)
    return results
