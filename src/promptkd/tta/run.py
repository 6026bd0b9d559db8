"""One test-time adaptation run (what ``promptkd tta`` does) over one or more datasets.

Per dataset: the base model (hand-written context or a CoOp/MaPLe checkpoint) gets the dataset's class list; source
files are checked against backbone, prompts and classes and image sizes against the crops, all before adaptation
starts; the test images are adapted ``batch_size`` at a time and accuracy and ECE of the adapted and of the base
(un-adapted) prediction are written as a result JSON with seconds per image and peak memory.

Modes. ``episodic`` (default): every image is adapted from the base state (TPT's prompt reset; empty caches for
TDA), so predictions do not depend on the test order; images are taken in dataset order. ``online``: the state
(carried prompts for TPT-style methods, caches for TDA/DPE/BoostAdapter) is carried across the test stream, whose
order is a permutation drawn from the seed (recorded in the result as ``stream``); ``--orders N`` runs N orders
(seeds S, S+1, ...), one result each, and ``promptkd report`` shows their spread. The result's method is
``<method>-online`` so that both modes can share a folder. Views are seeded per image path in both modes.

Under ``torchrun`` each rank adapts its own shard of the stream (positions rank, rank + world, ... of the order): in
episodic mode predictions equal a one-process run; in online mode each rank carries its own state, so predictions
depend on the number of ranks (recorded as ``stream.world_size``).

Resume. Every stream's predictions so far and the method's state are saved in ``<out>/tta-progress/`` (at most
every ``progress_every_s`` seconds, and when it ends); rerunning the same command resumes an interrupted run
exactly where it stopped (bit-identical predictions). A run into a folder holding another setting's interrupted
run (another method, order, checkpoint, ...) is refused before any work; ``--overwrite`` discards it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm.auto import tqdm

from promptkd.checkpoints import atomic_write_text
from promptkd.config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, apply_overrides, from_dict, load_preset, to_dict

__all__ = ["TTAOutcome", "TTARunConfig", "resolve_tta_config", "run_tta", "stream_order"]

logger = logging.getLogger(__name__)

TASK = "test_time_classification"


@dataclass
class TTARunConfig:
    """Everything that defines a test-time adaptation run (written to ``<out>/config.yaml``)."""

    method: str = "tpt"
    datasets: list[str] = field(default_factory=list)
    data_root: str | None = None
    split: str = "test"
    model: str | None = None
    pretrained: str | None = None
    quick_gelu: bool | None = None
    base: str | None = None  # CoOp / MaPLe checkpoint; None: hand-written context `init` on `model`
    init: str = "a photo of a"
    n_ctx: int = 4
    stats: str | None = None
    prototypes: str | None = None
    batch_size: int = 8
    max_images: int = 0
    seed: int = 0
    mode: Literal["episodic", "online"] | None = None  # None: the method's default_mode (online for cache methods)
    orders: int = field(default=1, metadata={"rule": AT_LEAST_ONE})
    progress_every_s: float = field(default=30.0, metadata={"rule": NON_NEGATIVE})
    allow_small_images: bool = False
    workers: int = 0
    text_memory_mb: float = 1024.0
    device: str = "auto"
    precision: str = "fp32"
    out: str = "runs/tta"
    progress: bool = True
    method_config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The result's method name: ``tpt`` (episodic) or ``tpt-online``."""
        return self.method if self.mode == "episodic" else f"{self.method}-online"

    @property
    def order_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.orders)]


def resolve_tta_config(preset: str | None, overrides: list[str], base: dict[str, Any]) -> TTARunConfig:
    """Preset (``configs/<method>/<preset>.yaml``: ``method:`` and ``run:`` sections) < command-line values <
    ``--set key=value`` (``method.x`` addresses the method's settings); strict at every layer."""
    from promptkd.tta.base import get_tta_method

    name = base.get("method") or "tpt"
    method_cls = get_tta_method(name)
    data: dict[str, Any] = {"method_config": {}}
    if preset:
        preset_data = load_preset(name, preset)
        unknown = set(preset_data) - {"method", "run"}
        if unknown:
            raise ConfigError(f"preset {preset!r}: unknown sections {sorted(unknown)} (expected 'method', 'run')")
        data["method_config"] = dict(preset_data.get("method") or {})
        data.update(preset_data.get("run") or {})
    data.update({k: v for k, v in base.items() if v is not None})
    renamed = [o.replace("method.", "method_config.", 1) if o.startswith("method.") else o for o in overrides]
    config = from_dict(TTARunConfig, apply_overrides(data, renamed), where="tta config")
    from_dict(method_cls.config_class, config.method_config, where=f"{name} settings")
    if not config.datasets:
        raise ConfigError("give at least one dataset (--datasets NAME ...)")
    if config.mode is None:
        config.mode = method_cls.default_mode
    if config.orders > 1 and config.mode != "online":
        raise ConfigError(
            f"--orders {config.orders} needs --mode online: episodic predictions do not depend on the test order"
        )
    return config


@dataclass
class TTAOutcome:
    out: Path
    results: list[dict[str, Any]]


def subset_items(items: list, max_images: int) -> list:
    """Every k-th item so that a capped run still covers all classes (items are in class order in most splits)."""
    if not max_images or max_images >= len(items):
        return items
    step = len(items) / max_images
    return [items[int(i * step)] for i in range(max_images)]


def stream_order(items: list, mode: str, seed: int) -> list[int]:
    """Positions of ``items`` in test-stream order: dataset order (episodic), or sorted by a hash of (seed, path)
    (online) — a permutation drawn from the seed that does not depend on how the split file lists the images."""
    if mode != "online":
        return list(range(len(items)))
    from promptkd.tta.views import image_seed

    return sorted(range(len(items)), key=lambda i: (image_seed(seed, f"order\0{items[i].path}"), i))


def _augmix(setting: str, dataset: str) -> bool:
    from promptkd.tta.views import FINE_GRAINED

    if setting == "auto":
        return dataset.lower() in FINE_GRAINED
    return setting == "on"


@dataclass
class _Run:
    """What every stream of a run shares (built before any model work)."""

    config: TTARunConfig
    info: Any
    device: torch.device
    method_cls: type
    method_config: Any
    out: Path
    sources: dict[str, Any]
    datasets: dict[str, tuple[Any, list]]  # key -> (splits, items)
    progress: Any  # promptkd.tta.progress.RunProgress
    overwrite: bool


@dataclass
class _Stream:
    """One dataset × order: its items in stream order, this rank's shard and the method adapting it."""

    name: str
    data: Any
    items: list
    seed: int
    order: list[int]
    shard: list[int]
    method: Any
    dataset: Any
    key: str


def run_tta(config: TTARunConfig, *, overwrite: bool = False) -> TTAOutcome:
    """Adapt and evaluate as ``config`` says; see the module docstring. An earlier result of the same setting in
    ``config.out`` is refused before any work unless ``overwrite``; an interrupted run of it is resumed."""
    from promptkd.engine.distributed import barrier

    run = _prepare(config, overwrite)
    model, description = _load_base_model(run)  # a checkpoint no method can adapt is refused here, nothing written
    for key, (data, items) in run.datasets.items():  # the method's checks on each class list and image set, too
        _make_stream(run, model, key, data, items, config.seed)
    _begin(run)
    results = []
    for key, (data, items) in run.datasets.items():
        for seed in config.order_seeds:
            stream = _make_stream(run, model, key, data, items, seed)
            if run.progress.is_done(stream.key):
                logger.info(
                    "%s %s seed %d: done in an earlier, interrupted invocation", config.label, stream.name, seed
                )
                continue
            table, timing = _adapt_stream(run, stream)
            if run.info.is_main:
                results.append(_write_outputs(run, stream, model, description, table, timing))
            run.progress.mark_done(stream.key)
    barrier(run.info)
    if run.info.is_main:
        run.progress.finish()
    return TTAOutcome(run.out, results)


def _prepare(config: TTARunConfig, overwrite: bool) -> _Run:
    """Settings, sources, datasets, earlier results and interrupted runs: everything checked before model work."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.engine.distributed import init_distributed
    from promptkd.paths import writable_folder
    from promptkd.results import check_result_free
    from promptkd.tta import progress as progress_files
    from promptkd.tta.base import get_tta_method
    from promptkd.tta.sources import Prototypes, SourceStats

    info, device = init_distributed(config.device)
    method_cls = get_tta_method(config.method)
    if config.mode is None:  # built without resolve_tta_config
        config.mode = method_cls.default_mode
    method_config = from_dict(method_cls.config_class, config.method_config, where=f"{config.method} settings")
    _check_mode(config, method_cls)
    out = writable_folder(config.out) if info.is_main else Path(config.out)
    sources: dict[str, Any] = {}
    if config.stats:
        sources["stats"] = SourceStats.load(config.stats)
    if config.prototypes:
        sources["prototypes"] = Prototypes.load(config.prototypes)
    datasets: dict[str, tuple[Any, list]] = {}
    for key in config.datasets:  # resolve every dataset before any model work, so a typo fails in milliseconds
        data = resolve_dataset(key, config.data_root)
        items = subset_items(data.split(config.split), config.max_images)
        if not items:
            raise ConfigError(f"{key} has no {config.split} images")
        datasets[key] = (data, items)
    identity = progress_files.run_identity(config, datasets, info.world_size)
    progress = progress_files.RunProgress.open(out, identity, info, overwrite=overwrite)
    for key, (data, _) in datasets.items():
        for seed in config.order_seeds:
            naming = {"method": config.label, "dataset": _name(data, key), "split": config.split, "seed": seed}
            if not progress.is_done(progress_files.stream_key(naming["dataset"], seed)):
                check_result_free(out, {**naming, "task": TASK}, overwrite=overwrite)
    return _Run(config, info, device, method_cls, method_config, out, sources, datasets, progress, overwrite)


def _begin(run: _Run) -> None:
    """Write the run's config and progress record, once every rank has checked the old ones."""
    from promptkd.engine.distributed import barrier

    barrier(run.info)
    if run.info.is_main:
        atomic_write_text(run.out / "config.yaml", yaml.safe_dump(to_dict(run.config), sort_keys=False))
        run.progress.start()
    barrier(run.info)


def _check_mode(config: TTARunConfig, method_cls: type) -> None:
    if config.mode == "online" and not getattr(method_cls, "stateful", True):
        logger.warning("%s keeps no state: its online predictions equal its episodic ones", config.method)


def _name(data: Any, key: str) -> str:
    return data.name or Path(key).name


def _load_base_model(run: _Run) -> tuple[Any, str]:
    """The frozen base: a --base checkpoint's prompts or the hand-written context on --model."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.tta.model import build_model

    config = run.config
    backbone = None
    if config.base is None:
        if not config.model:
            raise ConfigError("give --model (with a hand-written --init context) or a --base checkpoint")
        backbone = load_backbone(
            config.model,
            run_weights(config.model, config.pretrained),
            quick_gelu=config.quick_gelu,
            device=run.device,
            precision=config.precision,
        )
    first = next(iter(run.datasets.values()))[0]
    model, description = build_model(
        first.classnames,
        backbone=backbone,
        checkpoint=config.base,
        init=config.init,
        n_ctx=config.n_ctx,
        device=str(run.device),
        precision=config.precision,
        text_memory_mb=config.text_memory_mb,
        features_only=_training_free(run.method_cls),
    )
    model.eval()
    logger.info("%s: base model %s (%s)", config.method, model.backbone.spec.model_name, description)
    return model, description


def _training_free(method_cls: type) -> bool:
    from promptkd.tta.online import OnlineMethod

    return issubclass(method_cls, OnlineMethod)


def _method_settings(run: _Run, name: str) -> Any:
    """The method's settings for dataset ``name``: unset ones take its family's defaults (promptkd.tta.views)."""
    from promptkd.tta.views import dataset_settings

    return dataset_settings(run.method_config, name)


def _make_stream(run: _Run, model: Any, key: str, data: Any, items: list, seed: int) -> _Stream:
    """Class list, method (its checks against model, sources and classes), views and this rank's shard."""
    from promptkd.tta.progress import stream_key
    from promptkd.tta.views import TTAViewDataset, ViewConfig, check_image_sizes

    config, info = run.config, run.info
    name = _name(data, key)
    model.set_classnames(data.classnames)
    settings = _method_settings(run, name)
    method = run.method_cls(model, settings, run.sources)  # checks sources against backbone, prompts, classes
    method.mode = config.mode
    views = ViewConfig(
        n_views=settings.n_views,
        augmix=_augmix(settings.augmix, name),
        min_scale=settings.min_crop_scale,
        seed=seed,
        allow_small=config.allow_small_images,
    )
    check_image_sizes(items, model.backbone.preprocess.size, views)
    order = stream_order(items, config.mode, seed)
    shard = order[info.rank :: info.world_size]
    dataset = TTAViewDataset(items, model.backbone.preprocess, views)
    return _Stream(name, data, items, seed, order, shard, method, dataset, stream_key(name, seed))


@dataclass
class _Timing:
    seconds: float  # wall time of the adaptation loop (views included), summed over resumed parts
    adapt_seconds: float  # time inside the method (encoders and adaptation), summed
    cpu_seconds: float  # CPU time of the loop, all threads, summed over ranks (steadier than wall on a busy machine)
    peak_memory_mb: float  # per rank, the largest
    memory_delta_mb: float
    memory_measure: str = ""


def _adapt_stream(run: _Run, stream: _Stream) -> tuple[torch.Tensor, _Timing]:
    """Adapt this rank's shard in stream order, saving progress; returns every rank's rows, in stream order."""
    from promptkd.engine.distributed import gather_concat
    from promptkd.tta.progress import PeakMemory

    config, info = run.config, run.info
    saved = run.progress.load_stream(stream.key, info.rank)
    rows: list[torch.Tensor] = [saved.rows] if saved is not None else []
    done = 0 if saved is None else int(saved.rows.shape[0])
    if saved is not None:
        stream.method.load_state_dict(saved.state)
    seconds, adapt_seconds = (0.0, 0.0) if saved is None else (saved.seconds, saved.adapt_seconds)
    cpu_seconds = 0.0 if saved is None else saved.cpu_seconds
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(stream.dataset, stream.shard[done:]),
        batch_size=config.batch_size,
        num_workers=config.workers,
        shuffle=False,
    )
    meter = PeakMemory(run.device)
    bar = tqdm(
        total=len(stream.shard),
        initial=done,
        desc=f"{config.label} {stream.name}",
        disable=not (config.progress and info.is_main),
    )
    tic, cpu_tic, last_save = time.perf_counter(), time.process_time(), time.perf_counter()
    for batch_views, labels, indices in loader:
        result = stream.method.adapt(batch_views)
        adapt_seconds += result.seconds
        rows.append(_rows(indices, labels, result))
        bar.update(len(labels))
        bar.set_postfix(
            ms_per_image=f"{1000 * result.seconds / len(labels):.0f}",
            **{k: f"{v:.3f}" for k, v in result.losses.items()},
        )
        if time.perf_counter() - last_save >= config.progress_every_s:
            spent = (seconds + time.perf_counter() - tic, adapt_seconds, cpu_seconds + time.process_time() - cpu_tic)
            run.progress.save_stream(stream.key, info.rank, torch.cat(rows), stream.method.state_dict(), *spent)
            last_save = time.perf_counter()
    bar.close()
    seconds += time.perf_counter() - tic
    cpu_seconds += time.process_time() - cpu_tic
    n_cls = len(stream.data.classnames)
    local = torch.cat(rows) if rows else torch.zeros(0, 2 + 2 * n_cls, dtype=torch.float64)
    table = gather_concat(local, info)
    position = {index: p for p, index in enumerate(stream.order)}
    table = table[torch.tensor([position[int(i)] for i in table[:, 0].tolist()]).argsort()] if len(table) else table
    per_rank = [[seconds, adapt_seconds, cpu_seconds, meter.peak_mb(), meter.delta_mb()]]
    wall, adapt, cpu, peak, delta = gather_concat(torch.tensor(per_rank, dtype=torch.float64), info).unbind(1)
    timing = _Timing(float(wall.max()), float(adapt.sum()), float(cpu.sum()), float(peak.max()), float(delta.max()))
    timing.memory_measure = meter.measure
    return table, timing


def _rows(indices: torch.Tensor, labels: torch.Tensor, result: Any) -> torch.Tensor:
    """[b, 2 + 2C] rows: item index, label, adapted logits, base logits (float64)."""
    return torch.cat(
        [
            indices.unsqueeze(1).double(),
            labels.unsqueeze(1).double(),
            result.logits.double().cpu(),
            result.initial_logits.double().cpu(),
        ],
        dim=1,
    )


def _write_outputs(
    run: _Run, stream: _Stream, model: Any, description: str, table: torch.Tensor, timing: _Timing
) -> dict[str, Any]:
    """Metrics as TTA-VLM reports them (accuracy, ECE, seconds per image, peak memory), result JSON, predictions."""
    from promptkd.evaluation.metrics import TTA_ECE_BINS, classification_metrics
    from promptkd.results import make_result, write_result
    from promptkd.tta.progress import order_hash

    config, n_cls, n_items = run.config, len(stream.data.classnames), len(stream.items)
    labels = table[:, 1].long()
    adapted, initial = table[:, 2 : 2 + n_cls].float(), table[:, 2 + n_cls :].float()
    metrics = classification_metrics(adapted, labels, n_bins=TTA_ECE_BINS)
    base_metrics = classification_metrics(initial, labels, n_bins=TTA_ECE_BINS)
    metrics |= {f"base_{k}": v for k, v in base_metrics.items()}
    metrics["seconds_per_image"] = timing.seconds * run.info.world_size / max(1, n_items)
    metrics["ms_per_image"] = 1000 * metrics["seconds_per_image"]  # the report's column (2 decimals)
    metrics["adapt_seconds_per_image"] = timing.adapt_seconds / max(1, n_items)
    metrics["cpu_seconds_per_image"] = timing.cpu_seconds / max(1, n_items)
    metrics["peak_memory_mb"] = timing.peak_memory_mb
    metrics["memory_delta_mb"] = timing.memory_delta_mb
    stream_record = {
        "mode": config.mode,
        "order_seed": stream.seed if config.mode == "online" else None,
        "order_sha256": order_hash(stream.items, stream.order),
        "world_size": run.info.world_size,
        "memory_measure": timing.memory_measure,
    }
    record = make_result(
        dataset=stream.name,
        task=TASK,
        metrics=metrics,
        method=config.label,
        backbone=model.backbone,
        protocol="test_time",
        split=config.split,
        seed=stream.seed,
        num_classes=n_cls,
        num_samples=n_items,
        config=to_dict(config),
        classnames=stream.data.classnames,
        extra={"base_prompts": description, "method_config": to_dict(stream.method.config), "stream": stream_record},
    )
    path = write_result(record, run.out)
    suffix = "" if config.orders == 1 else f"-seed{stream.seed}"
    _write_predictions(
        run.out / f"{config.label}-{stream.name}{suffix}-predictions.csv",
        [stream.items[int(i)] for i in table[:, 0].tolist()],
        adapted,
        initial,
        stream.data.classnames,
    )
    print(
        f"{config.label} {stream.name}: acc {100 * metrics['acc1']:.2f} (base {100 * base_metrics['acc1']:.2f}), "
        f"ECE {100 * metrics['ece']:.2f} (base {100 * base_metrics['ece']:.2f}), "
        f"{1000 * metrics['seconds_per_image']:.1f} ms/image, peak {metrics['peak_memory_mb']:.0f} MB -> {path}"
    )
    return record


def _write_predictions(path: Path, items: list, adapted: torch.Tensor, initial: torch.Tensor, classnames) -> None:
    """One row per image, in stream order: path, true class, adapted prediction and its probability, base one."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "prediction", "probability", "base_prediction"])
    probs = adapted.softmax(-1)
    for item, p, q in zip(items, probs, initial):
        top = int(p.argmax())
        writer.writerow(
            [item.path, item.classname, classnames[top], f"{float(p[top]):.4f}", classnames[int(q.argmax())]]
        )
    atomic_write_text(path, buffer.getvalue())
