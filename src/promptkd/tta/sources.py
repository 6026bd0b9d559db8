"""Offline source files for test-time alignment, computed on a proxy source set (``promptkd tta-stats``).

- :class:`SourceStats` (PromptAlign): per visual block input x_l of the base model (its prompts inserted), the mean
  and biased variance over images per token position and channel. Accumulated in float64 sums in one pass (equal
  to the reference's two passes to well below float32 precision).
- :class:`Prototypes` (PromptSync): per class, the mean (unnormalised) image embedding over the class's proxy
  samples and their augmented views (visual prototype), a fixed number of normalised augmented-view features (the
  positives of the discrimination loss), and the class text feature with the base prompts (text prototype).

Both files (safetensors + JSON) record the backbone identity, a hash of the base prompts and, for prototypes, the
class list; loading them for another backbone, other prompts or classes they lack fails before adaptation starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from promptkd.checkpoints import load_tensor_record, save_tensor_record
from promptkd.data.items import Datum, ImageDataset
from promptkd.data.transforms import eval_transform
from promptkd.errors import PromptKDError
from promptkd.tta.model import PromptedCLIP
from promptkd.tta.views import TTAViewDataset, ViewConfig

__all__ = [
    "Prototypes",
    "SourceError",
    "SourceStats",
    "base_prompt_hash",
    "compute_prototypes",
    "compute_stats",
]

STATS_FORMAT = "promptkd-tta-stats"
PROTOTYPES_FORMAT = "promptkd-tta-prototypes"


class SourceError(PromptKDError, ValueError):
    """A statistics or prototype file that does not fit the model, the prompts or the class list."""


def base_prompt_hash(model: PromptedCLIP) -> str:
    """sha256 over the base prompts (names, shapes, float32 bytes): which prompts the statistics were taken with."""
    digest = hashlib.sha256()
    for key in sorted(model.base):
        tensor = model.base[key].detach().float().cpu().contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    if model.fixed_visual is not None:
        digest.update(model.fixed_visual.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    weights, config = _paths(path)
    save_tensor_record(weights, config, tensors, meta)
    return weights


def _load(path: str | Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights, config = _paths(path)
    if not weights.exists() or not config.exists():
        raise SourceError(f"{weights} / {config}: file not found; compute it with `promptkd tta-stats`.")
    tensors, meta = load_tensor_record(weights, config)  # a damaged file is refused, never used
    if meta.get("format") != fmt:
        raise SourceError(f"{config}: not a {fmt} file (format {meta.get('format')!r}).")
    return tensors, meta


def _check_identity(meta: dict[str, Any], model: PromptedCLIP, what: str, source: str) -> None:
    spec = model.backbone.spec
    if not spec.same_identity(meta.get("backbone") or {}):
        stored = meta.get("backbone") or {}
        raise SourceError(
            f"{source}: {what} were computed with backbone {stored.get('model_name')} "
            f"({stored.get('pretrained')}), but the model is {spec.model_name} ({spec.pretrained}); "
            "recompute them with `promptkd tta-stats` for this backbone."
        )
    if meta.get("prompts_sha256") != base_prompt_hash(model):
        raise SourceError(
            f"{source}: {what} were computed with other base prompts ({meta.get('prompts')}); recompute them with "
            "`promptkd tta-stats` and the same --base checkpoint."
        )


@dataclass
class SourceStats:
    """Per-layer token means and variances [T, D] of the base model's visual block inputs on a proxy set."""

    layers: list[int]
    means: list[torch.Tensor]
    variances: list[torch.Tensor]
    meta: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        tensors = {f"mean.{layer}": m for layer, m in zip(self.layers, self.means)}
        tensors |= {f"var.{layer}": v for layer, v in zip(self.layers, self.variances)}
        return _save(path, tensors, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> SourceStats:
        tensors, meta = _load(path, STATS_FORMAT)
        layers = [int(layer) for layer in meta["layers"]]
        expected = {f"{kind}.{layer}" for layer in layers for kind in ("mean", "var")}
        if set(tensors) != expected:
            raise SourceError(f"{path}: tensors {sorted(tensors)} do not match the layers {layers} it records")
        return cls(layers, [tensors[f"mean.{i}"] for i in layers], [tensors[f"var.{i}"] for i in layers], meta)

    def check(self, model: PromptedCLIP, layers: Sequence[int], source: str = "statistics file") -> None:
        _check_identity(self.meta, model, "token statistics", source)
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise SourceError(f"{source}: no statistics for visual layers {missing} (it has {self.layers})")

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = self.layers.index(index)
        return self.means[position], self.variances[position]


@dataclass
class Prototypes:
    """Class prototypes: visual [C, E] (unnormalised mean), views [C, A, E] (normalised), text [C, E]."""

    classnames: list[str]
    visual: torch.Tensor
    views: torch.Tensor
    text: torch.Tensor
    meta: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        return _save(
            path,
            {"visual": self.visual, "views": self.views, "text": self.text},
            {**self.meta, "classnames": self.classnames},
        )

    @classmethod
    def load(cls, path: str | Path) -> Prototypes:
        tensors, meta = _load(path, PROTOTYPES_FORMAT)
        if set(tensors) != {"visual", "views", "text"}:
            raise SourceError(f"{path}: expected tensors visual, views, text; found {sorted(tensors)}")
        classnames = list(meta.get("classnames") or [])
        if tensors["visual"].shape[0] != len(classnames):
            raise SourceError(f"{path}: {tensors['visual'].shape[0]} prototypes but {len(classnames)} class names")
        return cls(classnames, tensors["visual"], tensors["views"], tensors["text"], meta)

    def rows(self, classnames: Sequence[str], source: str = "prototype file") -> Prototypes:
        """The prototypes of ``classnames`` in that order; refuses classes the file does not have."""
        index = {name: i for i, name in enumerate(self.classnames)}
        missing = [name for name in classnames if name not in index]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise SourceError(
                f"{source}: no prototypes for {len(missing)} of the {len(classnames)} test classes ({shown}); "
                "the prototypes must be computed on a proxy source set with the same classes."
            )
        rows = torch.tensor([index[name] for name in classnames], dtype=torch.long)
        return Prototypes(list(classnames), self.visual[rows], self.views[rows], self.text[rows], self.meta)

    def check(self, model: PromptedCLIP, source: str = "prototype file") -> None:
        _check_identity(self.meta, model, "prototypes", source)
        embed = model.initial_text_features().shape[-1]
        if self.visual.shape[-1] != embed:
            raise SourceError(f"{source}: prototypes have width {self.visual.shape[-1]}, the model's is {embed}")


def _meta(fmt: str, model: PromptedCLIP, proxy: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": fmt,
        "version": 1,
        "backbone": model.backbone.spec.to_dict(),
        "prompts_sha256": base_prompt_hash(model),
        "proxy": proxy,
        **extra,
    }


def _loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def compute_stats(
    model: PromptedCLIP,
    items: Sequence[Datum],
    layers: Sequence[int],
    *,
    proxy: str = "",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> SourceStats:
    """Token statistics of the visual block inputs ``layers`` over ``items`` (evaluation view, base prompts)."""
    n_blocks = model.image_encoder.n_blocks
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise SourceError(f"visual layers {bad} do not exist; the image tower has blocks 0..{n_blocks - 1}")
    if not items:
        raise SourceError("the proxy source set is empty")
    wanted = set(layers)
    sums: dict[int, torch.Tensor] = {}
    squares: dict[int, torch.Tensor] = {}

    def hook(index: int, x: torch.Tensor) -> None:
        if index in wanted:
            x = x.detach().double()
            sums[index] = sums.get(index, 0) + x.sum(0)
            squares[index] = squares.get(index, 0) + (x * x).sum(0)

    dataset = ImageDataset(items, eval_transform(model.backbone.preprocess))
    count = 0
    for images, _ in tqdm(_loader(dataset, batch_size, workers), desc="token statistics", disable=not progress):
        model.encode_images(images.to(model.device), block_hook=hook)
        count += images.shape[0]
    means = [(sums[layer] / count) for layer in layers]
    variances = [(squares[layer] / count - m * m).clamp_min(0) for layer, m in zip(layers, means)]
    meta = _meta(STATS_FORMAT, model, proxy, layers=list(layers), n_images=count)
    return SourceStats(list(layers), [m.float() for m in means], [v.float() for v in variances], meta)


@torch.no_grad()
def compute_prototypes(
    model: PromptedCLIP,
    items: Sequence[Datum],
    classnames: Sequence[str],
    *,
    n_augmented: int = 8,
    views_per_class: int = 16,
    proxy: str = "",
    seed: int = 0,
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = True,
) -> Prototypes:
    """Class prototypes from labelled proxy ``items`` and ``n_augmented`` augmented views of each (TPT's views)."""
    if not items:
        raise SourceError("the proxy source set is empty")
    n_cls = len(classnames)
    labels = sorted({int(item.label) for item in items})
    if labels[0] < 0 or labels[-1] >= n_cls:
        raise SourceError(f"proxy labels {labels[0]}..{labels[-1]} do not fit the {n_cls} class names")
    empty = [classnames[c] for c in range(n_cls) if c not in set(labels)]
    if empty:
        raise SourceError(f"the proxy set has no images of {len(empty)} classes ({', '.join(empty[:5])})")
    model.set_classnames(list(classnames))
    dataset = TTAViewDataset(items, model.backbone.preprocess, ViewConfig(n_views=1 + n_augmented, seed=seed))
    embed = model.initial_text_features().shape[-1]
    sums = torch.zeros(n_cls, embed, dtype=torch.float64)
    counts = torch.zeros(n_cls, dtype=torch.float64)
    kept: list[list[torch.Tensor]] = [[] for _ in range(n_cls)]
    for views, targets, _ in tqdm(_loader(dataset, batch_size, workers), desc="prototypes", disable=not progress):
        batch, n_views = views.shape[:2]
        features = model.encode_images(views.flatten(0, 1).to(model.device), normalize=False).cpu()
        features = features.view(batch, n_views, -1)
        for row, label in enumerate(targets.tolist()):
            sums[label] += features[row].double().sum(0)
            counts[label] += n_views
            room = views_per_class - len(kept[label])
            if room > 0 and n_views > 1:
                kept[label].extend(torch.nn.functional.normalize(features[row, 1 : 1 + room], dim=-1).unbind(0))
    per_class = min(len(k) for k in kept)
    if per_class == 0:
        raise SourceError("no augmented views were kept; use n_augmented >= 1")
    views_tensor = torch.stack([torch.stack(k[:per_class]) for k in kept])
    meta = _meta(
        PROTOTYPES_FORMAT,
        model,
        proxy,
        n_images=len(items),
        n_augmented=n_augmented,
        views_per_class=per_class,
        seed=seed,
    )
    visual = (sums / counts.unsqueeze(1)).float()
    return Prototypes(list(classnames), visual, views_tensor, model.initial_text_features().cpu(), meta)
