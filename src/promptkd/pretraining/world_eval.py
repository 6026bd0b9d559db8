"""Zero-shot accuracy of a CLIP on the embedded world's compositions, seen and held out of pre-training.

The images are rendered in memory from the world spec (deterministic, independent of the world's own seed), and
scored with :mod:`promptkd.evaluation.zeroshot`: the same classifier (prompt features, L2-normalised) and image
feature extraction as every zero-shot evaluation of the package, so a pre-training curve and `promptkd zeroshot`
measure the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["WorldZeroShot", "ZeroShotSet", "world_zero_shot_sets"]


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


class _Normalised(torch.utils.data.Dataset):
    """uint8 images as the model's normalised input (they are already at its resolution)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return (self.images[index].float() / 255.0 - self.mean) / self.std, int(self.labels[index])


class WorldZeroShot:
    """Zero-shot accuracy with the model's own towers over each :class:`ZeroShotSet`, in percent."""

    def __init__(self, sets: Sequence[ZeroShotSet], batch_size: int = 256) -> None:
        self.sets = list(sets)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, backbone: Any) -> dict[str, float]:
        from promptkd.evaluation.features import extract_features
        from promptkd.evaluation.zeroshot import zeroshot_classifier, zeroshot_logits

        out: dict[str, float] = {}
        was_training = backbone.model.training
        try:
            for s in self.sets:
                if s.images.shape[-1] != backbone.image_size:
                    raise ValueError(
                        f"{s.name}: images are {s.images.shape[-1]} px, the model takes {backbone.image_size}"
                    )
                # One prompt per class, already written out: the "{}" template is the prompt itself.
                weights = zeroshot_classifier(backbone, s.prompts, ["{}"], use_cache=False)
                data = _Normalised(s.images, s.labels, backbone.preprocess.mean, backbone.preprocess.std)
                loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False)
                features = extract_features(backbone, loader, progress=False)
                scores = zeroshot_logits(backbone, features.features, weights)
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
            backbone.model.train(was_training)
        _add_summaries(out, self.sets)
        return out


def _add_summaries(out: dict[str, float], sets: Sequence[ZeroShotSet]) -> None:
    """Image-weighted means over sets of the metrics every set shares (e.g. ``held_out`` over the world's families)."""
    for metric in ("seen", "held_out", "held_out_only"):
        for style in sorted({s.name.rsplit("_", 1)[-1] for s in sets}):
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
