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

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from promptkd.checkpoints import atomic_write_text, classnames_hash
from promptkd.config import ConfigError, to_dict
from promptkd.distill.teacher import TeacherError, TeacherFeatures, build_teacher
from promptkd.engine.config import TrainConfig
from promptkd.engine.run import attach_run_log, detach_run_log
from promptkd.methods.presets import resolve_layered
from promptkd.paths import writable_folder

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
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # timm students: create_model keyword arguments
    dataset: str | None = None
    data_root: str | None = None
    unlabeled_folder: str | None = None
    unlabeled_shards: str | None = None
    classnames: str | None = None  # class-name file for folder/shard sources
    eval_dataset: str | None = None  # folder/shard sources: a labelled dataset whose test split scores the student
    unlabeled_split: Literal["train", "test"] = "train"
    max_per_class: int = 0
    max_images: int = 0
    lanes: int = 0  # tar shards: lanes of the stream (0: one per shard); a multiple of ranks x workers
    epoch_samples: int = 0  # tar shards: samples per epoch (0: every image once)
    teacher_cache: str | None = None  # folder of the teacher's stored soft labels (FKD); None: live teacher only
    teacher_cache_topk: int = 0  # 0: full logits; k: FKD's top-k form
    teacher_cache_dtype: Literal["fp32", "fp16"] = "fp32"
    teacher_cache_max_gb: float = 0.0  # stop storing beyond this size (0: no limit)
    views: int = 10  # with a teacher cache: stored views per image (a run visits view (epoch + offset) % views)
    view_seed: int = 0  # with a teacher cache: seed of the views' crops (fixed, so other runs share them)
    protocol: Literal["base2new", "all"] = "base2new"
    seed: int = 1
    device: str = "auto"
    out: str = "runs/distill"
    evaluate: bool = True
    skip_bad: bool = False
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.seed is None:  # one seed moves the data order too, unless train.seed is set apart
            self.train.seed = self.seed


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
    train_seconds: float = 0.0  # the engine's training time (also without an evaluation)


def _read_classnames(path: str | None) -> list[str]:
    from promptkd.data.userdata import read_classnames

    if not path:
        raise ConfigError("an unlabelled folder or tar shards need --classnames FILE (one class name per line)")
    return read_classnames(path)


def student_method(model: str | None) -> str:
    """The method that distils into this student: ``promptkd`` (a prompted CLIP tower) or ``promptkd_timm``."""
    return "promptkd_timm" if str(model or "").startswith("timm:") else "promptkd"


@dataclass
class _Setup:
    """What a distillation run and a teacher-cache fill share: data, teacher, stored features, student, views."""

    splits: Any
    mode: str
    all_classes: list[str]
    source: Any  # UnlabeledSource, or None for tar shards
    teacher: Any
    stored: TeacherFeatures
    features_path: Path
    student: Any
    recipe: Any = None
    cache: Any = None

    @property
    def logit_classes(self) -> list[str]:
        """The classes the student's (and the cached teacher's) logits cover: the source's (the base half in
        inductive mode), or every class for streamed shards."""
        return list(self.source.classnames) if self.source is not None else list(self.all_classes)


def _check_config(config: DistillRunConfig) -> None:
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
    if config.unlabeled_shards and config.max_images:
        raise ConfigError("tar shards stream: give the epoch length with --epoch-samples instead of --max-images")


def _setup(config: DistillRunConfig, info: Any, device: Any, out: Path, *, must_write: bool = False) -> _Setup:
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.backbones.timm_models import is_timm_name, load_timm_backbone
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import check_images
    from promptkd.distill.cache import TeacherCache, ViewRecipe, features_sha256
    from promptkd.distill.data import from_folder, from_splits

    precision = config.train.precision
    # --- classes and unlabelled images -------------------------------------------------------------------------------
    splits = None
    source = None
    mode = str(config.method_config.get("mode", "transductive"))
    if config.dataset:
        splits = resolve_dataset(config.dataset, config.data_root, classnames=config.classnames)
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
        if config.unlabeled_folder:
            source = from_folder(config.unlabeled_folder, all_classes, max_images=config.max_images, seed=config.seed)
            bad = check_images(source.paths, skip_bad=config.skip_bad, source=config.unlabeled_folder)
            if bad:  # left out up front (--skip-bad), and counted in the run's config.yaml
                dropped = set(bad)
                source.paths = [p for p in source.paths if p not in dropped]
                source.notes.append(f"{len(bad)} unreadable images left out: {bad[:5]}")
        if config.eval_dataset:  # scored on a labelled test split; never trained on
            splits = resolve_dataset(config.eval_dataset, config.data_root)
    # --- teacher and its stored features (once, after its prompts are loaded) ----------------------------------------
    teacher = build_teacher(  # random weights (--teacher-pretrained random) are a function of the seed
        config.teacher,
        model=config.teacher_model,
        pretrained=config.teacher_pretrained,
        quick_gelu=config.teacher_quick_gelu,
        classnames=all_classes,
        templates=[splits.template] if splits is not None else None,
        device=device,
        precision=precision,
        seed=config.seed,
    )
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
    # --- student -------------------------------------------------------------------------------------------------
    if is_timm_name(config.student_model):  # sees what the teacher sees: its input size and statistics
        torch.manual_seed(config.seed)  # random weights are a function of the seed
        student = load_timm_backbone(
            config.student_model,
            config.student_pretrained,
            image_size=teacher.preprocess.size,
            mean=tuple(teacher.preprocess.mean),
            std=tuple(teacher.preprocess.std),
            kwargs=config.student_kwargs,
            device=device,
            precision=precision,
        )
    else:
        if config.student_kwargs:
            raise ConfigError("--student-kwargs applies to timm students (--student-model timm:NAME) only")
        torch.manual_seed(config.seed)  # so are a random student's
        student = load_backbone(
            config.student_model,
            run_weights(config.student_model, config.student_pretrained, flag="--student-pretrained"),
            quick_gelu=config.student_quick_gelu,
            device=device,
            precision=precision,
        )
    setup = _Setup(splits, mode, all_classes, source, teacher, stored, features_path, student)
    if config.teacher_cache:  # stored views, and the teacher's logits for each, stored once
        setup.recipe = ViewRecipe.for_student(
            student.preprocess, config.train.crop_scale, config.views, config.view_seed
        )
        classes = setup.logit_classes  # the base half in inductive mode: the cache holds what the student scores
        setup.cache = TeacherCache(
            config.teacher_cache,
            {
                "teacher": teacher.identity,
                "features_sha256": features_sha256(stored.rows(classes)),
                "classnames_sha256": classnames_hash(classes),
                "num_classes": len(classes),
                "logit_scale": float(stored.logit_scale),
                "recipe": setup.recipe.describe(),
            },
            storage="topk" if config.teacher_cache_topk else "full",
            topk=config.teacher_cache_topk or 10,
            dtype=config.teacher_cache_dtype,
            max_gb=config.teacher_cache_max_gb,
            writer=str(info.rank),
            must_write=must_write,
        )
    return setup


def run_distillation(config: DistillRunConfig) -> DistillOutcome:
    """Train a PromptKD student as ``config`` says; see the module docstring."""
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.data.shards import ShardLanes
    from promptkd.data.transforms import build_transform, train_transform
    from promptkd.distill.cache import StoredViews
    from promptkd.distill.data import read_image, unlabeled_dataset
    from promptkd.engine.distributed import init_distributed
    from promptkd.engine.stream import StreamSource
    from promptkd.engine.trainer import Trainer
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    _check_config(config)
    method_cls = get_method(student_method(config.student_model))
    info, device = init_distributed(config.device)
    out = writable_folder(config.out) if info.is_main else Path(config.out)
    handler = attach_run_log(out, info.is_main)
    try:
        setup = _setup(config, info, device, out)
        source, recipe, cache, student, stored = setup.source, setup.recipe, setup.cache, setup.student, setup.stored
        method_config_data = dict(config.method_config)
        known = {f.name for f in dataclasses.fields(method_cls.config_class)}
        unused = sorted(set(method_config_data) - known)
        if unused and method_cls.name != "promptkd":  # a preset's prompt settings mean nothing to a timm student
            logger.info("%s student: prompt settings %s not used", method_cls.name, ", ".join(unused))
            method_config_data = {k: v for k, v in method_config_data.items() if k in known}
        method_config_data.update(
            teacher_checkpoint=str(config.teacher or ""),
            teacher_model=str(config.teacher_model or ""),
            teacher_pretrained=str(config.teacher_pretrained or ""),
            teacher_features=str(setup.features_path),
        )
        method_config = config_from(method_cls, method_config_data)
        train_tf = train_transform(student.preprocess, scale=config.train.crop_scale)
        eval_tf = build_transform(student.preprocess, train=False)
        if source is not None:
            if recipe is not None:
                train_set = StoredViews(source.paths, source.keys(), recipe, config.seed, read_image)
            else:
                train_set = unlabeled_dataset(source, train_tf, skip_bad=config.skip_bad)
            classes = setup.logit_classes
            data_summary = source.summary()
        else:
            lanes = ShardLanes(config.unlabeled_shards, lanes=config.lanes, seed=config.seed)
            epoch_samples = config.epoch_samples or lanes.total
            prepare = recipe.prepare(config.seed, lambda p: p // epoch_samples) if recipe is not None else None
            train_set = StreamSource(
                lanes,
                None if prepare is not None else train_tf,
                seed=config.seed,
                epoch_samples=epoch_samples,
                skip_bad=config.skip_bad,
                prepare=prepare,
            )
            classes = setup.logit_classes
            data_summary = {**train_set.summary(), "classes": len(classes), "mode": setup.mode}
        if recipe is not None:
            data_summary["views"] = {"per_image": recipe.views, "seed": recipe.seed}
        logger.info("unlabelled images: %s", data_summary)
        torch.manual_seed(config.seed)
        method = method_cls(student, classes, method_config, features=stored, teacher=setup.teacher)
        val_set = None
        splits = setup.splits
        if splits is not None and config.train.select == "val" and splits.val:
            part = subsample_classes(splits, "base") if setup.mode == "inductive" else splits
            val_set = ImageDataset(part.val, eval_tf, skip_bad=config.skip_bad)  # held-out, labelled: selection only
        resolved = to_dict(config)
        resolved["method_config"] = to_dict(method_config)
        resolved["unlabeled"] = data_summary
        resolved["teacher_identity"] = setup.teacher.identity
        if info.is_main:
            atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        method.attach_cache(cache)
        trainer = Trainer(method, config.train, out, device=device, info=info, run_config=resolved)
        outcome = trainer.fit(train_set, val_set)
        if cache is not None:
            cache.flush()
            resolved["teacher_cache"] = cache.summary()
            logger.info("teacher cache: %s", cache.summary())
            if cache.report():
                logger.warning("%s", cache.report())
        if isinstance(train_set, StreamSource) and train_set.skipped:
            resolved["skipped_members"] = list(train_set.skipped)
        if info.is_main and (cache is not None or "skipped_members" in resolved):  # what training found, recorded
            atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        method.attach_cache(None)
        method.detach_teacher()  # inference never needs it
        results = _evaluate(
            config, method, student, splits, setup.mode, eval_tf, resolved, outcome, setup.teacher.identity, info
        )
        return DistillOutcome(
            out, outcome.checkpoint, setup.features_path, outcome.selection, results, outcome.history, outcome.seconds
        )
    finally:
        detach_run_log(handler)


def _fill_sources(config: DistillRunConfig, setup: _Setup, info: Any) -> Any:
    """This rank's images for a fill: (key, where, read() -> encoded bytes, decode(bytes) -> RGB image); every
    W-th image of a dataset or folder, or its own shards (streamed)."""
    from promptkd.data.shards import ShardLanes, decode_image
    from promptkd.distill.data import decode_rgb, read_bytes

    if setup.source is not None:
        keys, paths = setup.source.keys(), setup.source.paths
        for index in range(info.rank, len(keys), info.world_size):
            path = paths[index]
            yield keys[index], path, lambda p=path: read_bytes(p), lambda data, p=path: decode_rgb(data, p)
        return
    lanes = ShardLanes(config.unlabeled_shards, lanes=config.lanes, seed=config.seed)
    for lane in range(info.rank, lanes.lanes, info.world_size):
        for shard in lanes.lane_shards(lane):
            for sample in lanes.members(shard):
                yield (
                    sample.key,
                    sample.where,
                    lambda s=sample: s.data,
                    lambda data, s=sample: decode_image(data, s.where),
                )


def fill_teacher_cache(config: DistillRunConfig, *, batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Compute and store the teacher's logits of every stored view of every image (``promptkd teacher-cache``).

    Views already stored for the image's current content are skipped, so a killed fill resumes and a fill repairs
    a cache (rows of damaged chunks, images whose content changed); under torchrun each rank takes its own images
    and writes its own chunks. A cache that cannot store what was asked is a TeacherCacheError (exit 2).
    """
    from tqdm.auto import tqdm

    from promptkd.data.items import DataError
    from promptkd.distill.cache import content_fingerprint, view_name
    from promptkd.distill.teacher import TeacherInput
    from promptkd.engine.distributed import barrier, init_distributed

    _check_config(config)
    if not config.teacher_cache:
        raise ConfigError("give the cache folder to fill: --teacher-cache DIR")
    info, device = init_distributed(config.device)
    out = writable_folder(config.out) if info.is_main else Path(config.out)
    handler = attach_run_log(out, info.is_main)
    try:
        setup = _setup(config, info, device, out, must_write=True)
        recipe, cache, teacher = setup.recipe, setup.cache, setup.teacher
        convert = TeacherInput(setup.student.preprocess, teacher.preprocess)
        scale = float(setup.stored.logit_scale)
        text = setup.stored.rows(setup.logit_classes).float().to(device)
        pending: list[tuple[str, torch.Tensor]] = []
        skipped: list[str] = []

        def run(batch: list[tuple[str, torch.Tensor]]) -> None:
            stacked = torch.stack([view for _, view in batch]).to(device)
            with torch.no_grad():
                logits = teacher.logits(convert(stacked), text, scale)
            cache.put([name for name, _ in batch], logits)
            bar.update(len(batch))

        with tqdm(desc="teacher views", unit="view", disable=not (progress and info.is_main)) as bar:
            for key, where, read, decode in _fill_sources(config, setup, info):
                try:
                    data = read()
                    content = content_fingerprint(data)
                    wanted = [v for v in range(recipe.views) if not cache.contains(view_name(key, v, content))]
                    image = decode(data) if wanted else None
                except DataError:
                    if not config.skip_bad:
                        raise
                    skipped.append(where)
                    continue
                for view in wanted:
                    pending.append((view_name(key, view, content), recipe.crop(image, key, view)))
                    if len(pending) == batch_size:
                        run(pending)
                        pending = []
            if pending:
                run(pending)
        cache.flush()
        barrier(info)
        summary = {**cache.summary(), "skipped_images": skipped}
        if cache.report():
            logger.warning("%s", cache.report())
        if info.is_main:
            atomic_write_text(out / "teacher_cache.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        detach_run_log(handler)


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
    from promptkd.evaluation.metrics import harmonic_mean
    from promptkd.results import make_result, write_result

    if not config.evaluate or splits is None or not splits.test:
        if config.evaluate:
            logger.info("no labelled test split: nothing evaluated")
        return []
    trained_on = list(method.classnames)
    halves = ["base", "new", "all"] if config.protocol == "base2new" else ["all"]
    results: list[dict[str, Any]] = []
    scored = evaluate_halves(method, splits, halves, eval_tf, config.train.precision, config.skip_bad, info)
    accs = {half: metrics["acc1"] for half, _, metrics, _, _ in scored}
    for half, part, metrics, count, skipped in scored:
        results.append(
            make_result(
                dataset=config.dataset or config.eval_dataset,
                task="classification",
                metrics=metrics,
                method=method.name,
                backbone=student,
                protocol="base2new" if config.protocol == "base2new" else "cross_dataset",
                subsample=half,
                seed=config.seed,
                num_classes=len(part.classnames),
                num_samples=count,
                config=resolved,
                skipped_images=skipped,
                selection=outcome.selection,
                extra={
                    "mode": mode,
                    "transductive": mode == "transductive",
                    "unlabeled_split": config.unlabeled_split,
                    "teacher": teacher_identity,
                    "train_seconds": outcome.seconds,
                    "train_images_per_second": outcome.images_per_second,
                    "unlabeled_skipped": len(resolved.get("skipped_members", [])),
                    **({"teacher_cache": resolved["teacher_cache"]} if "teacher_cache" in resolved else {}),
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


def evaluate_halves(
    method: Any,
    splits: Any,
    halves: list[str],
    transform: Any,
    precision: str = "fp32",
    skip_bad: bool = False,
    info: Any = None,
) -> list[tuple[str, Any, dict[str, float], int, list[str]]]:
    """Score a student on each half's test split among that half's classes (its rows of the stored features):
    (half, split part, metrics, images, skipped) per half that has test images. The class list is restored."""
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.engine.trainer import predict_logits
    from promptkd.evaluation.metrics import classification_metrics

    trained_on = list(method.classnames)
    scored = []
    try:
        for half in halves:
            part = subsample_classes(splits, half) if half != "all" else splits
            if not part.test:
                continue
            method.set_classnames(part.classnames)
            test_set = ImageDataset(part.test, transform, skip_bad=skip_bad)
            logits, labels = predict_logits(
                method, test_set, precision=precision, device=method.all_text_features.device, info=info
            )
            scored.append((half, part, classification_metrics(logits, labels), len(labels), test_set.skipped))
    finally:
        method.set_classnames(trained_on)
    return scored
