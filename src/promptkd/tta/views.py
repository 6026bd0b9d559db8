"""Test-time views: per test image, the original plus N-1 augmented views, the same whatever the order of the test set.

View 0 is the evaluation view (resize the shorter side to the model's size, centre crop). Views 1..N-1 are TPT's
(``AugMixAugmenter``): ``RandomResizedCrop(size, scale=(0.08, 1))`` + horizontal flip of the *original* image,
then, for the fine-grained datasets, AugMix with TPT's settings (3 chains of 1-3 geometric/histogram ops, severity 1,
no colour/contrast/brightness/sharpness ops, Dirichlet(1) chain weights, Beta(1, 1) mix); torchvision's ``AugMix``
with ``all_ops=False`` is exactly that op set.

Randomness is seeded per image from (seed, the image's path), not from its position, so a prediction never depends
on the order of the test set or on how it is sharded across ranks (TPT's shuffled loader with seed 0 does).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from promptkd.data.benchmarks import BENCHMARKS
from promptkd.data.items import DataError, Datum, load_rgb
from promptkd.data.transforms import eval_transform, interpolation_mode, seeded_cpu_rng

__all__ = ["FINE_GRAINED", "TTAViewDataset", "ViewConfig", "check_image_sizes", "image_seed", "min_image_side"]

#: TPT's "fine-grained" sets get AugMix views; ImageNet and its variants only crop + flip (TPT ``get_dataset``).
FINE_GRAINED = frozenset(name for name in BENCHMARKS if not name.startswith("imagenet"))


@dataclass(frozen=True)
class ViewConfig:
    n_views: int = 64
    augmix: bool = False
    min_scale: float = 0.08
    seed: int = 0
    allow_small: bool = False

    def __post_init__(self) -> None:
        if self.n_views < 1:
            raise ValueError("n_views must be at least 1 (view 0 is the original image)")
        if not 0 < self.min_scale <= 1:
            raise ValueError("min_scale must be in (0, 1]")


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and an image's identity (its path)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def min_image_side(size: int, min_scale: float) -> int:
    """Shortest image side for which the smallest random crop still spans about one model patch row per 8 px.

    A crop of area fraction ``min_scale`` has side ~ sqrt(min_scale) of the image; below this bound the crops are a
    handful of pixels blown up to the model's resolution.
    """
    return max(2, math.ceil(size * math.sqrt(min_scale)))


def check_image_sizes(items: Sequence[Datum], size: int, config: ViewConfig, limit: int = 5) -> None:
    """Refuse images too small for the crops before any adaptation starts (headers only, fast)."""
    if config.allow_small or config.n_views == 1:
        return
    needed = min_image_side(size, config.min_scale)
    small: list[str] = []
    for item in items:
        try:
            with Image.open(item.path) as image:
                width, height = image.size
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read the image: {error}", path=item.path) from error
        if min(width, height) < needed:
            small.append(f"{item.path} ({width}x{height})")
    if small:
        shown = ", ".join(small[:limit]) + (f" and {len(small) - limit} more" if len(small) > limit else "")
        raise DataError(
            f"{len(small)} image(s) have a side below {needed} px, too small for {size} px random crops of scale "
            f">= {config.min_scale}: {shown}. Use larger images, or pass --allow-small-images to upsample them."
        )


class TTAViewDataset(torch.utils.data.Dataset):
    """Item i -> (views [N, 3, S, S], label, i); view 0 is the evaluation view."""

    def __init__(self, items: Sequence[Datum], preprocess, config: ViewConfig):
        self.items = list(items)
        self.config = config
        self.base = eval_transform(preprocess)
        size = int(preprocess.size)
        interpolation = interpolation_mode(preprocess.interpolation)
        self.crop = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(config.min_scale, 1.0), interpolation=interpolation),
                T.RandomHorizontalFlip(),
            ]
        )
        self.augmix = T.AugMix(severity=1, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False)
        self.finish = T.Compose([T.ToTensor(), T.Normalize(tuple(preprocess.mean), tuple(preprocess.std))])

    def __len__(self) -> int:
        return len(self.items)

    def views(self, image: Image.Image, key: str) -> torch.Tensor:
        config = self.config
        out = [self.base(image)]
        with seeded_cpu_rng(image_seed(config.seed, key)):
            for _ in range(config.n_views - 1):
                view = self.crop(image)
                if config.augmix:
                    view = self.augmix(view)
                out.append(self.finish(view))
        return torch.stack(out)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        return self.views(load_rgb(item.path), item.path), int(item.label), index
