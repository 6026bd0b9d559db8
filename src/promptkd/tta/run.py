"""One test-time tuning run (what ``promptkd tta`` does) over one or more datasets.

Per dataset: the base model (hand-written context or a CoOp/MaPLe checkpoint) gets the dataset's class list; source
files are checked against backbone, prompts and classes and image sizes against the crops, all before adaptation
starts; the test images are adapted ``batch_size`` at a time (each an independent episode), sharded across
``torchrun`` ranks by index (predictions do not depend on the sharding: views are seeded per image path); accuracy
and ECE of the adapted and of the base (un-adapted) prediction are written as a result JSON with per-image latency.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from promptkd.checkpoints import atomic_write_text
from promptkd.config import ConfigError, apply_overrides, from_dict, load_preset, to_dict

__all__ = ["TTAOutcome", "TTARunConfig", "resolve_tta_config", "run_tta"]

logger = logging.getLogger(__name__)

TASK = "test_time_classification"


@dataclass
class TTARunConfig:
    """Everything that defines a test-time tuning run (written to ``<out>/config.yaml``)."""

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
    allow_small_images: bool = False
    workers: int = 0
    text_memory_mb: float = 1024.0
    device: str = "auto"
    precision: str = "fp32"
    out: str = "runs/tta"
    progress: bool = True
    method_config: dict[str, Any] = field(default_factory=dict)


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


def _augmix(setting: str, dataset: str) -> bool:
    from promptkd.tta.views import FINE_GRAINED

    if setting == "auto":
        return dataset.lower() in FINE_GRAINED
    return setting == "on"


def run_tta(config: TTARunConfig, *, overwrite: bool = False) -> TTAOutcome:
    """Adapt and evaluate as ``config`` says; see the module docstring. An earlier result of the same setting in
    ``config.out`` is refused before any work unless ``overwrite``."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.loading import run_weights
    from promptkd.data.datasets import resolve_dataset
    from promptkd.engine.distributed import barrier, gather_concat, init_distributed
    from promptkd.evaluation.metrics import classification_metrics
    from promptkd.paths import writable_folder
    from promptkd.results import check_result_free, make_result, write_result
    from promptkd.tta.base import get_tta_method
    from promptkd.tta.model import build_model
    from promptkd.tta.sources import Prototypes, SourceStats
    from promptkd.tta.views import TTAViewDataset, ViewConfig, check_image_sizes

    info, device = init_distributed(config.device)
    method_cls = get_tta_method(config.method)
    method_config = from_dict(method_cls.config_class, config.method_config, where=f"{config.method} settings")
    out = writable_folder(config.out) if info.is_main else Path(config.out)
    if info.is_main:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    sources: dict[str, Any] = {}
    if config.stats:
        sources["stats"] = SourceStats.load(config.stats)
    if config.prototypes:
        sources["prototypes"] = Prototypes.load(config.prototypes)
    # resolve every dataset before any model work, so a typo fails in milliseconds
    splits = {name: resolve_dataset(name, config.data_root) for name in config.datasets}
    for key, data in splits.items():
        naming = {"method": config.method, "dataset": data.name or Path(key).name, "split": config.split}
        check_result_free(out, {**naming, "seed": config.seed, "task": TASK}, overwrite=overwrite)
    first = splits[config.datasets[0]]
    backbone = None
    if config.base is None:
        if not config.model:
            raise ConfigError("give --model (with a hand-written --init context) or a --base checkpoint")
        backbone = load_backbone(
            config.model,
            run_weights(config.model, config.pretrained),
            quick_gelu=config.quick_gelu,
            device=device,
            precision=config.precision,
        )
    model, description = build_model(
        first.classnames,
        backbone=backbone,
        checkpoint=config.base,
        init=config.init,
        n_ctx=config.n_ctx,
        device=str(device),
        precision=config.precision,
        text_memory_mb=config.text_memory_mb,
    )
    model.eval()
    logger.info("%s: base model %s (%s)", config.method, model.backbone.spec.model_name, description)
    results = []
    for key, data in splits.items():
        name = data.name or Path(key).name
        items = subset_items(data.split(config.split), config.max_images)
        if not items:
            raise ConfigError(f"{key} has no {config.split} images")
        model.set_classnames(data.classnames)
        method = method_cls(model, method_config, sources)  # checks sources against backbone, prompts, classes
        views = ViewConfig(
            n_views=method_config.n_views,
            augmix=_augmix(method_config.augmix, name),
            min_scale=method_config.min_crop_scale,
            seed=config.seed,
            allow_small=config.allow_small_images,
        )
        check_image_sizes(items, model.backbone.preprocess.size, views)
        dataset = TTAViewDataset(items, model.backbone.preprocess, views)
        shard = list(range(info.rank, len(dataset), info.world_size))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, shard),
            batch_size=config.batch_size,
            num_workers=config.workers,
            shuffle=False,
        )
        rows: list[torch.Tensor] = []
        tic = time.perf_counter()
        bar = tqdm(total=len(shard), desc=f"{config.method} {name}", disable=not (config.progress and info.is_main))
        for batch_views, labels, indices in loader:
            result = method.adapt(batch_views)
            rows.append(
                torch.cat(
                    [
                        indices.unsqueeze(1).double(),
                        labels.unsqueeze(1).double(),
                        result.logits.double().cpu(),
                        result.initial_logits.double().cpu(),
                    ],
                    dim=1,
                )
            )
            bar.update(len(labels))
            bar.set_postfix(
                ms_per_image=f"{1000 * result.seconds / len(labels):.0f}",
                **{k: f"{v:.3f}" for k, v in result.losses.items()},
            )
        bar.close()
        seconds = time.perf_counter() - tic
        local = torch.cat(rows) if rows else torch.zeros(0, 2 + 2 * len(data.classnames), dtype=torch.float64)
        table = gather_concat(local, info)
        seconds_total = gather_concat(torch.tensor([[seconds]], dtype=torch.float64), info).max().item()
        order = table[:, 0].argsort()
        table = table[order]
        n_cls = len(data.classnames)
        labels_all = table[:, 1].long()
        adapted = table[:, 2 : 2 + n_cls].float()
        initial = table[:, 2 + n_cls :].float()
        metrics = classification_metrics(adapted, labels_all)
        base_metrics = classification_metrics(initial, labels_all)
        metrics |= {f"base_{k}": v for k, v in base_metrics.items()}
        metrics["seconds_per_image"] = seconds_total * info.world_size / max(1, len(items))
        if info.is_main:
            record = make_result(
                dataset=name,
                task=TASK,
                metrics=metrics,
                method=config.method,
                backbone=model.backbone,
                protocol="test_time",
                split=config.split,
                seed=config.seed,
                num_classes=n_cls,
                num_samples=len(items),
                config=to_dict(config),
                classnames=data.classnames,
                extra={"base_prompts": description, "method_config": to_dict(method_config)},
            )
            path = write_result(record, out)
            results.append(record)
            _write_predictions(
                out / f"{config.method}-{name}-predictions.csv",
                [items[int(i)] for i in table[:, 0].tolist()],
                adapted,
                initial,
                data.classnames,
            )
            print(
                f"{config.method} {name}: acc {100 * metrics['acc1']:.2f} (base {100 * base_metrics['acc1']:.2f}), "
                f"ECE {100 * metrics['ece']:.2f} (base {100 * base_metrics['ece']:.2f}), "
                f"{1000 * metrics['seconds_per_image']:.0f} ms/image -> {path}"
            )
    barrier(info)
    return TTAOutcome(out, results)


def _write_predictions(path: Path, items: list, adapted: torch.Tensor, initial: torch.Tensor, classnames) -> None:
    """One row per image: path, true class, adapted prediction and its probability, base prediction."""
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
