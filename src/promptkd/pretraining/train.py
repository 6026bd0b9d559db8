"""Contrastive pre-training of a (small) CLIP from captioned images, in memory, deterministically, on a CPU.

The embedded world's corpus is small (about 11k 32-pixel images), so every image is decoded once into one uint8
tensor and every distinct caption is tokenised once; a step is then a gather, a flip, two encoder passes and the
loss of :mod:`promptkd.pretraining.losses`. All randomness (batch order, caption choice, augmentation) comes from
one generator seeded by ``PretrainConfig.seed``, so the same seed on the same machine gives identical weights.

Defaults follow the feasibility probe of ``world-notes.md``: image-text-label loss, AdamW at lr 1e-3 with a
one-cycle schedule, batch 128, random horizontal flips; bf16 autocast roughly halves a step on AVX-512-BF16 CPUs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from promptkd.backbones import Backbone, autocast_for
from promptkd.data.items import DataError
from promptkd.pretraining.losses import OBJECTIVES, clamp_logit_scale_, objective_loss

__all__ = [
    "CURVE_NAME",
    "HISTORY_NAME",
    "CaptionDataset",
    "PretrainConfig",
    "PretrainHistory",
    "ZeroShotEvaluator",
    "ZeroShotSet",
    "encode_text",
    "load_caption_dataset",
    "plot_history",
    "pretrain",
    "resolve_caption_file",
    "save_pretrained",
    "world_zero_shot_sets",
]

logger = logging.getLogger(__name__)

HISTORY_NAME = "pretrain_history.json"
CURVE_NAME = "pretrain_curve.png"
SCHEDULES = ("onecycle", "cosine")
TRAIN_PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """Hyper-parameters of one pre-training run (defaults: the world-notes probe, which reached 47% zero-shot on
    unseen compositions with a 128-wide 4-layer CLIP after 600 steps)."""

    objective: str = field(default="itl", metadata={"help": "clip (image-text InfoNCE) or itl (same label = positive)"})
    steps: int = field(default=600, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=128, metadata={"help": "image-caption pairs per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not gains, biases, scale)"})
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: str = field(default="onecycle", metadata={"help": "onecycle or cosine (linear warm-up, cosine decay)"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up"})
    grad_clip: float | None = field(default=1.0, metadata={"help": "max global gradient norm; None = off"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 autocast (fp32 master weights)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips (labels are flip-invariant)"})
    translate: float = field(default=0.0, metadata={"help": "random shifts up to this fraction of the side"})
    zoom: tuple[float, float] = field(
        default=(1.0, 1.0), metadata={"help": "random content scale range; below 1 shrinks objects (edge padding)"}
    )
    noise: float = field(default=0.0, metadata={"help": "std of Gaussian pixel noise, in 0-255 units"})
    seed: int = field(default=0, metadata={"help": "batch order, caption choice and augmentation"})
    log_every: int = field(default=25, metadata={"help": "steps per history record of the training loss"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations (and one at the end); 0 = end"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision must be one of {TRAIN_PRECISIONS} for pre-training, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {self.steps} and {self.batch_size}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.translate < 0 or self.noise < 0 or self.log_every < 1 or self.eval_every < 0:
            raise ValueError("translate, noise and eval_every must be >= 0 and log_every >= 1")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.zoom = (float(self.zoom[0]), float(self.zoom[1]))
        if not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be a range 0 < low <= high, got {self.zoom}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Data: captioned images held in memory
# ----------------------------------------------------------------------------------------------------------------------


def _to_array(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (size x size x 3): resize the shorter side to ``size`` (bicubic) and centre-crop, as CLIP does."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def _image_root(caption_file: Path) -> Path:
    """World and COCO layouts keep paths relative to an ``images/`` folder next to the caption file."""
    images = caption_file.parent / "images"
    return images if images.is_dir() else caption_file.parent


@dataclass
class CaptionDataset:
    """Images decoded once into memory, with their captions and (optional) class labels.

    Attributes:
        images: uint8 tensor (N x 3 x S x S).
        captions: the captions of each image (one is drawn per step when there are several).
        labels: long tensor (N,), ``-1`` where the source has no label.
        classnames: class name of each label (``classnames[label]``), empty when unknown.
        source: the file the data came from (for the history).
    """

    images: torch.Tensor
    captions: list[list[str]]
    labels: torch.Tensor
    classnames: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be a uint8 N x 3 x S x S tensor, got {self.images.dtype} {self.images.shape}"
            )
        if len(self.captions) != n or self.labels.shape != (n,):
            raise ValueError(f"{n} images but {len(self.captions)} caption lists and {self.labels.shape[0]} labels")
        if any(not c for c in self.captions):
            raise ValueError("every image needs at least one caption")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self) > 0

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": len(self),
            "captions": sum(len(c) for c in self.captions),
            "classes": len(self.classnames) if self.classnames else int(self.labels.max().item()) + 1,
            "image_size": self.image_size,
        }

    @classmethod
    def from_images(
        cls,
        images: Sequence[Image.Image | np.ndarray],
        captions: Sequence[str | Sequence[str]],
        labels: Sequence[int] | None = None,
        classnames: Sequence[str] = (),
        image_size: int | None = None,
        source: str = "",
    ) -> CaptionDataset:
        """Build from in-memory images (PIL or H x W x 3 uint8 arrays), e.g. rendered ones."""
        if not images:
            raise ValueError("no images")
        arrays = []
        for image in images:
            pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
            arrays.append(_to_array(pil, image_size or min(pil.size)))
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        caps = [[c] if isinstance(c, str) else list(c) for c in captions]
        lab = torch.tensor(list(labels) if labels is not None else [-1] * len(caps), dtype=torch.long)
        return cls(tensor, caps, lab, list(classnames), source)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], image_size: int, image_root: str | os.PathLike[str] | None = None
    ) -> CaptionDataset:
        """Read ``captions.jsonl`` (``{"image", "caption"|"captions", "label"?, "classname"?}`` per line) or a COCO
        captions JSON (``images`` + ``annotations``), decoding every image once at ``image_size``.

        Image paths are relative to ``image_root``, by default the ``images/`` folder next to the file (the world's
        and COCO's layout) or else the file's folder. Lines naming the same image are merged (several captions).
        """
        path = Path(path)
        if not path.is_file():
            raise DataError("caption file does not exist", path=path, expected="a captions.jsonl or COCO .json file")
        root = Path(image_root) if image_root is not None else _image_root(path)
        entries = _read_jsonl(path) if path.suffix == ".jsonl" else _read_coco(path)
        return _decode(entries, path, root, image_size)


@dataclass
class _Entry:
    image: str
    captions: list[str]
    label: int | None
    classname: str | None
    where: int | str  # line number (jsonl) or "images[k]" (COCO), for error messages


_FORMAT = 'one JSON object per line: {"image": "<path relative to images/>", "caption": "...", "label": 0, ...}'


def _read_jsonl(path: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"not valid JSON ({error.msg} at column {error.colno})",
                    path=path,
                    line=number,
                    expected=_FORMAT,
                    fix="repair or delete this line",
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise DataError('no "image" path on this line', path=path, line=number, expected=_FORMAT)
            caps = row.get("captions", row.get("caption"))
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise DataError(
                    'no "caption" (a non-empty string) on this line', path=path, line=number, expected=_FORMAT
                )
            label = row.get("label")
            if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
                raise DataError(f'"label" must be a non-negative integer, got {label!r}', path=path, line=number)
            classname = row.get("classname")
            entries.append(
                _Entry(row["image"], list(caps), label, classname if isinstance(classname, str) else None, number)
            )
    if not entries:
        raise DataError("no captions in the file", path=path, expected=_FORMAT)
    return entries


def _read_coco(path: Path) -> list[_Entry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"not valid JSON ({error.msg})",
            path=path,
            line=error.lineno,
            expected="COCO captions JSON with 'images' and 'annotations'",
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise DataError(
            "not a COCO captions file",
            path=path,
            expected="a JSON object with 'images' and 'annotations'",
            fix="use the COCO captions format, or a .jsonl file with one image-caption pair per line",
        )
    by_id: dict[Any, _Entry] = {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DataError(f"images[{k}] needs 'id' and 'file_name'", path=path)
        label = image.get("label", image.get("category_id"))
        by_id[image["id"]] = _Entry(
            image["file_name"], [], label if isinstance(label, int) else None, image.get("classname"), f"images[{k}]"
        )
    for k, ann in enumerate(data["annotations"]):
        entry = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if entry is None or not isinstance(ann.get("caption"), str):
            raise DataError(f"annotations[{k}] needs a known 'image_id' and a 'caption'", path=path)
        entry.captions.append(ann["caption"])
    entries = [e for e in by_id.values() if e.captions]
    if len(entries) < len(by_id):
        logger.warning("%s: %d images have no caption and are left out", path, len(by_id) - len(entries))
    if not entries:
        raise DataError("no captioned images in the file", path=path)
    return entries


def _labels_of(entries: list[_Entry], path: Path) -> tuple[list[int], list[str]]:
    """Labels and class names: given labels win; class names alone are numbered in order of appearance."""
    if all(e.label is not None for e in entries):
        names: dict[int, str] = {}
        for e in entries:
            if e.classname is None:
                continue
            known = names.setdefault(e.label, e.classname)  # type: ignore[arg-type]
            if known != e.classname:
                where = f"line {e.where}" if isinstance(e.where, int) else e.where
                raise DataError(
                    f"{where}: label {e.label} is named {e.classname!r} here but {known!r} before",
                    path=path,
                    expected="one class name per label",
                )
        n = max(e.label for e in entries) + 1  # type: ignore[type-var]
        classnames = [names.get(k, str(k)) for k in range(n)] if names else []
        return [int(e.label) for e in entries], classnames  # type: ignore[arg-type]
    if all(e.classname is not None for e in entries):
        index: dict[str, int] = {}
        labels = [index.setdefault(e.classname, len(index)) for e in entries]  # type: ignore[arg-type]
        return labels, list(index)
    return [-1] * len(entries), []


def _decode(entries: list[_Entry], path: Path, root: Path, image_size: int) -> CaptionDataset:
    merged: dict[str, _Entry] = {}
    for e in entries:
        if e.image in merged:
            merged[e.image].captions.extend(c for c in e.captions if c not in merged[e.image].captions)
        else:
            merged[e.image] = _Entry(e.image, list(e.captions), e.label, e.classname, e.where)
    items = list(merged.values())
    missing = [e for e in items if not (root / e.image).is_file()]
    if missing:
        first = missing[0]
        listed = "\n".join(f"    {_where(e)}: {root / e.image}" for e in missing[:10])
        more = f"\n    ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"{len(missing)} of {len(items)} listed images do not exist (relative to {root}):\n{listed}{more}",
            path=path,
            line=first.where if isinstance(first.where, int) else None,
            expected="every image named in the caption file to exist",
            fix="restore the images, fix the paths, or pass the folder they are relative to (image_root)",
        )
    labels, classnames = _labels_of(items, path)
    arrays = np.empty((len(items), image_size, image_size, 3), dtype=np.uint8)
    for k, e in enumerate(items):
        try:
            with Image.open(root / e.image) as image:
                arrays[k] = _to_array(image, image_size)
        except (OSError, ValueError, SyntaxError) as error:
            raise DataError(
                f"{_where(e)}: cannot read image {root / e.image} ({type(error).__name__}: {error})",
                path=path,
                line=e.where if isinstance(e.where, int) else None,
                fix="replace the file or remove it from the caption file",
            ) from None
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    logger.info("loaded %d images with %d captions from %s", len(items), sum(len(e.captions) for e in items), path)
    return CaptionDataset(
        images, [e.captions for e in items], torch.tensor(labels, dtype=torch.long), classnames, str(path)
    )


def _where(e: _Entry) -> str:
    return f"line {e.where}" if isinstance(e.where, int) else str(e.where)


def resolve_caption_file(data: str | os.PathLike[str]) -> Path:
    """A world root (``world.json`` + ``pretrain/captions.jsonl``), a folder holding ``captions.jsonl``, or a file."""
    path = Path(data).expanduser()
    if path.is_dir():
        for candidate in (path / "pretrain" / "captions.jsonl", path / "captions.jsonl"):
            if candidate.is_file():
                return candidate
        raise DataError(
            "no caption file in this folder",
            path=path,
            expected="an embedded-world root (with pretrain/captions.jsonl), a folder with captions.jsonl, or a file",
            fix="build the world first (promptkd.data.world.build_world(root), or --build-world), or pass the file",
        )
    if not path.is_file():
        raise DataError("no such file or folder", path=path, expected="a world root, captions.jsonl or COCO .json")
    return path


def load_caption_dataset(data: str | os.PathLike[str], image_size: int) -> CaptionDataset:
    """:meth:`CaptionDataset.from_file` on whatever :func:`resolve_caption_file` finds at ``data``."""
    return CaptionDataset.from_file(resolve_caption_file(data), image_size)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ZeroShotSet:
    """Labelled images plus one prompt per class; ``metrics`` maps a metric name to (the classes whose images count,
    the classes predicted among, ``None`` = all)."""

    name: str
    images: torch.Tensor  # uint8 N x 3 x S x S
    labels: torch.Tensor
    prompts: list[str]
    metrics: dict[str, tuple[list[int], list[int] | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = {"acc": (list(range(len(self.prompts))), None)}


def _normalise(images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    mean = torch.tensor(backbone.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(backbone.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class ZeroShotEvaluator:
    """Zero-shot accuracy with the model's own towers: ``argmax_c cos(encode_image(x), encode_text(prompt_c))``."""

    def __init__(self, sets: Sequence[ZeroShotSet], batch_size: int = 256, precision: str = "fp32") -> None:
        self.sets = list(sets)
        self.batch_size = batch_size
        self.precision = precision

    @torch.no_grad()
    def __call__(self, backbone: Backbone) -> dict[str, float]:
        model, device = backbone.model, backbone.device
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            with autocast_for(self.precision, device):
                for s in self.sets:
                    text = model.encode_text(backbone.tokenize(s.prompts).to(device), normalize=True).float()
                    logits = []
                    for start in range(0, len(s.images), self.batch_size):
                        x = _normalise(s.images[start : start + self.batch_size], backbone).to(device)
                        logits.append(model.encode_image(x, normalize=True).float() @ text.t())
                    scores = torch.cat(logits).cpu()
                    for metric, (classes, among) in s.metrics.items():
                        keep = torch.isin(s.labels, torch.tensor(classes))
                        sub = scores[keep]
                        if among is not None:
                            masked = torch.full_like(sub, float("-inf"))
                            masked[:, among] = sub[:, among]
                            sub = masked
                        acc = (sub.argmax(dim=1) == s.labels[keep]).float().mean().item() if keep.any() else math.nan
                        out[f"{s.name}/{metric}"] = 100.0 * acc
        finally:
            model.train(was_training)
        _add_summaries(out, self.sets)
        return out


def _add_summaries(out: dict[str, float], sets: Sequence[ZeroShotSet]) -> None:
    """Image-weighted means over sets of the metrics every set shares (e.g. ``held_out`` over the world's families)."""
    for metric in ("seen", "held_out", "held_out_only"):
        for style in {s.name.rsplit("_", 1)[-1] for s in sets}:
            total = weight = 0.0
            for s in sets:
                key = f"{s.name}/{metric}"
                if s.name.endswith(f"_{style}") and key in out and not math.isnan(out[key]):
                    n = int(torch.isin(s.labels, torch.tensor(s.metrics[metric][0])).sum())
                    total, weight = total + out[key] * n, weight + n
            if weight:
                out[f"{style}/{metric}"] = total / weight


def _zero_shot_prompt(classname: str, family: str) -> str:
    # "a photo of a {}." as in the benchmarks; count classes are plural ("two stars"), so they take no article.
    return f"a photo of {classname}." if family == "counts" else f"a photo of a {classname}."


def world_zero_shot_sets(
    image_size: int = 32, per_class: int = 10, styles: Sequence[str] = ("clean", "scene"), seed: int = 12345
) -> list[ZeroShotSet]:
    """Zero-shot sets rendered in memory from the world spec: every class of every family, ``per_class`` images each.

    Metrics per set: ``seen`` (compositions in the pre-training corpus, all-way), ``held_out`` (compositions never
    seen in pre-training, all-way among the family's classes) and ``held_out_only`` (the same images, predicted
    among the held-out classes only). Style ``clean`` is the pre-training look (pure compositional transfer);
    ``scene`` is the downstream datasets' look (what prompt learning later starts from). The seed is independent of
    the world's, and rendering is deterministic, so every run is scored on the same pixels.
    """
    from promptkd.data.world import FAMILIES, render

    sets = []
    for f_index, (name, family) in enumerate(FAMILIES.items()):
        held = set(family.held_out)
        seen_ids = [k for k, c in enumerate(family.classnames) if c not in held]
        held_ids = [k for k, c in enumerate(family.classnames) if c in held]
        prompts = [_zero_shot_prompt(c, name) for c in family.classnames]
        for s_index, style in enumerate(styles):
            images, labels = [], []
            for label, classname in enumerate(family.classnames):
                rng = np.random.default_rng([seed, f_index, s_index, label])
                for _ in range(per_class):
                    images.append(np.asarray(render(classname, style, rng, image_size=image_size)))
                    labels.append(label)
            tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            metrics = {"seen": (seen_ids, None), "held_out": (held_ids, None), "held_out_only": (held_ids, held_ids)}
            sets.append(ZeroShotSet(f"{name}_{style}", tensor, torch.tensor(labels), prompts, metrics))
    return sets


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainHistory:
    """What a run did: its settings, the training loss every ``log_every`` steps, each evaluation, and timings."""

    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.config.get("steps", 1))

    @property
    def final_loss(self) -> float:
        return self.train[-1]["loss"] if self.train else math.nan

    @property
    def final_eval(self) -> dict[str, float]:
        return self.eval[-1] if self.eval else {}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_per_step": self.seconds_per_step}

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on gains, biases, layer norms, 1-d embeddings or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _scheduler(optimizer: torch.optim.Optimizer, config: PretrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    warm = config.warmup
    if config.schedule == "onecycle":
        # Momentum cycling is left off: AdamW's beta1 stays at its value, so only the learning rate moves.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=max(warm, 1e-3), cycle_momentum=False
        )
    warm_steps = round(warm * config.steps)

    def factor(step: int) -> float:
        if step < warm_steps:
            return (step + 1) / warm_steps
        progress = (step - warm_steps) / max(1, config.steps - warm_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Batcher:
    """Seeded epoch-wise shuffling, caption choice and augmentation, all from one generator."""

    def __init__(self, dataset: CaptionDataset, tokens: torch.Tensor, config: PretrainConfig) -> None:
        self.dataset, self.config = dataset, config
        self.gen = torch.Generator().manual_seed(config.seed)
        counts = torch.tensor([len(c) for c in dataset.captions])
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.tokens = tokens  # one row per caption, image-major
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.config.batch_size
        while len(self.order) < b:
            self.order = torch.cat([self.order, torch.randperm(len(self.dataset), generator=self.gen)])
        index, self.order = self.order[:b], self.order[b:]
        pick = (torch.rand(b, generator=self.gen) * self.counts[index]).long()
        text = self.tokens[self.offsets[index] + pick]
        images = self.dataset.images[index]
        if self.config.hflip:
            flip = torch.rand(b, generator=self.gen) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return self._augment(images), text, self.dataset.labels[index]

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        """Random zoom and shift in one affine resampling (edge pixels fill the border), then pixel noise."""
        c = self.config
        if c.translate == 0 and c.zoom == (1.0, 1.0) and c.noise == 0:
            return images
        b = images.shape[0]
        x = images.float()
        if c.translate or c.zoom != (1.0, 1.0):
            lo, hi = c.zoom
            scale = lo + (hi - lo) * torch.rand(b, generator=self.gen)
            # Shift range in normalised [-1, 1] units: the requested fraction plus the slack a zoom-out leaves.
            slack = 2 * c.translate + (1 - scale).clamp(min=0)
            shift = (2 * torch.rand(b, 2, generator=self.gen) - 1) * slack[:, None]
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
            theta[:, :, 2] = -shift / scale[:, None]
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if c.noise:
            x = (x + c.noise * torch.randn(x.shape, generator=self.gen)).clamp(0, 255)
        return x


def _tokenize_all(backbone: Backbone, dataset: CaptionDataset, chunk: int = 4096) -> torch.Tensor:
    """Tokenise every distinct caption once; returns one row per (image, caption), image-major, with the padding
    columns that no caption reaches cut off when :func:`encode_text` can use the shorter rows exactly."""
    flat = [c for caps in dataset.captions for c in caps]
    unique = list(dict.fromkeys(flat))
    rows = torch.cat([backbone.tokenize(unique[i : i + chunk]) for i in range(0, len(unique), chunk)])
    if _can_trim(backbone.model):
        rows = rows[:, : int((rows != 0).any(dim=0).nonzero().max()) + 1]
    where = {c: k for k, c in enumerate(unique)}
    return rows[torch.tensor([where[c] for c in flat])]


def _can_trim(model: nn.Module) -> bool:
    """Causal text tower pooled at the end-of-text token: positions after it never influence the feature."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and model.text_pool_type in ("argmax", "eos")
    )


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``model.encode_text`` for token rows that may be shorter than the context length.

    open_clip's CLIP always runs the whole context (40-77 positions) though captions of the world take about 16;
    under the causal mask, with end-of-text pooling, the trailing padding cannot change the pooled feature, so the
    rows are run at their own length: the same computation as ``CLIP.encode_text`` on fewer positions (2-4x less
    text compute). Anything else (CustomTextCLIP, other pooling, full-length rows) goes to ``model.encode_text``.
    """
    length = tokens.shape[1]
    if not _can_trim(model) or length == model.positional_embedding.shape[0]:
        return model.encode_text(tokens, normalize=normalize)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def pretrain(
    backbone: Backbone,
    dataset: CaptionDataset,
    config: PretrainConfig | None = None,
    *,
    evaluate: Callable[[Backbone], dict[str, float]] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> PretrainHistory:
    """Train all of ``backbone.model`` contrastively on ``dataset``; return (and with ``out_dir`` save) the history.

    The weights are trained in place, starting from whatever ``backbone`` holds (seed the global torch generator
    before :func:`~promptkd.backbones.load_backbone` for a reproducible random initialisation). ``evaluate`` is
    called every ``config.eval_every`` steps and after the last one, e.g. a :class:`ZeroShotEvaluator`.
    With ``out_dir`` the model is written as an open_clip ``local-dir`` folder (reload it with
    ``load_backbone("local-dir:<out_dir>")``) next to ``pretrain_history.json`` and ``pretrain_curve.png``.
    """
    config = config or PretrainConfig()
    if config.objective == "itl" and not dataset.has_labels:
        raise DataError(
            "objective 'itl' needs a class label for every image",
            path=dataset.source or None,
            fix="add 'label' or 'classname' to each line, or use objective 'clip'",
        )
    if dataset.image_size != backbone.image_size:
        raise ValueError(
            f"dataset images are {dataset.image_size} px but {backbone.spec.model_name} expects "
            f"{backbone.image_size} px; load the dataset with image_size={backbone.image_size}"
        )
    if config.batch_size > len(dataset):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(dataset)} images")

    model, device = backbone.model, backbone.device
    _warn_slow_bf16(config.precision, device)
    history = PretrainHistory(config.to_dict(), backbone.describe(), dataset.summary())
    tokens = _tokenize_all(backbone, dataset)
    batcher = _Batcher(dataset, tokens, config)
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
    )
    scheduler = _scheduler(optimizer, config)
    logger.info(
        "pre-training %s on %d images: %s, %d steps of %d, lr %g (%s), %s",
        backbone.spec.model_name,
        len(dataset),
        config.objective,
        config.steps,
        config.batch_size,
        config.lr,
        config.schedule,
        config.precision,
    )

    model.train()
    window: list[float] = []
    bar = tqdm(total=config.steps, desc="pretrain", disable=not config.progress, dynamic_ncols=True, leave=False)
    try:
        step_start = time.perf_counter()
        for step in range(1, config.steps + 1):
            images, text, labels = batcher.next()
            x = _normalise(images, backbone).to(device)
            with autocast_for(config.precision, device):
                image_features = model.encode_image(x, normalize=True)
                text_features = encode_text(model, text.to(device))
            loss = objective_loss(config.objective, image_features, text_features, model.logit_scale, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            clamp_logit_scale_(model)
            window.append(float(loss.detach()))
            bar.update(1)

            if step % config.log_every == 0 or step == config.steps:
                history.train_seconds += time.perf_counter() - step_start
                record = {
                    "step": step,
                    "loss": sum(window) / len(window),
                    "lr": optimizer.param_groups[0]["lr"],
                    "logit_scale": float(model.logit_scale.detach().exp()),
                    "seconds": history.train_seconds,
                }
                history.train.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                logger.debug("step %d: loss %.4f", step, record["loss"])
                window = []
                step_start = time.perf_counter()
            if evaluate is not None and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
                history.train_seconds += time.perf_counter() - step_start
                eval_start = time.perf_counter()
                metrics = evaluate(backbone)
                history.eval_seconds += time.perf_counter() - eval_start
                history.eval.append({"step": step, **metrics})
                logger.info("step %d: %s", step, _format_metrics(metrics))
                step_start = time.perf_counter()
    finally:
        bar.close()
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])

    logger.info(
        "pre-training took %.1f s (%.3f s per step), final loss %.4f",
        history.train_seconds,
        history.seconds_per_step,
        history.final_loss,
    )
    if out_dir is not None:
        save_pretrained(backbone, history, out_dir)
    return history


def _warn_slow_bf16(precision: str, device: torch.device) -> None:
    """bf16 autocast is ~2x faster than fp32 with AVX512-BF16/AMX, but ~10x slower without (emulated)."""
    if precision == "bf16" and device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if not capability.startswith("AVX512"):
            logger.warning(
                "bf16 on this CPU (%s, no AVX-512) has no fast matrix kernels and is many times slower than fp32; "
                "use precision fp32",
                capability,
            )


def _format_metrics(metrics: dict[str, float], limit: int = 6) -> str:
    keys = [k for k in metrics if "/" in k and k.count("/") == 1 and not k.split("/")[0].count("_")] or list(metrics)
    return ", ".join(f"{k} {metrics[k]:.1f}" for k in keys[:limit])


def save_pretrained(backbone: Backbone, history: PretrainHistory, out_dir: str | os.PathLike[str]) -> Path:
    """Write the model (open_clip ``local-dir`` folder), ``pretrain_history.json`` and ``pretrain_curve.png``."""
    from promptkd.backbones.export import save_local_dir

    folder = save_local_dir(backbone, out_dir)
    history.save(folder / HISTORY_NAME)
    plot_history(history, folder / CURVE_NAME)
    logger.info("wrote %s", folder)
    return folder


def plot_history(history: PretrainHistory, path: str | os.PathLike[str]) -> Path:
    """Training loss (left) and the summary zero-shot accuracies (right) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in history.train], [r["loss"] for r in history.train], color="C0")
    ax_loss.set(xlabel="step", ylabel=f"{history.config.get('objective', '')} loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    keys = [k for k in (history.eval[0] if history.eval else {}) if k != "step" and not k.split("/")[0].count("_")]
    keys = keys or [k for k in (history.eval[0] if history.eval else {}) if k != "step"][:8]
    for k in keys:
        ax_acc.plot([r["step"] for r in history.eval], [r[k] for r in history.eval], marker="o", label=k)
    ax_acc.set(xlabel="step", ylabel="zero-shot accuracy (%)", title="zero-shot accuracy")
    ax_acc.grid(alpha=0.3)
    if keys:
        ax_acc.legend(fontsize=8)
    fig.suptitle(
        f"{history.model.get('model_name', '')}: {history.config.get('steps')} steps, {history.train_seconds:.0f} s"
    )
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
