"""Test-time views as TPT makes them (azshue/TPT ``data/datautils.py`` ``AugMixAugmenter``, ``data/augmix_ops.py``).

Per test image: view 0 is the evaluation view (the model's resize + centre crop); views 1..N-1 are each a
``RandomResizedCrop(size, scale=(0.08, 1))`` of the *original* image with torchvision's default ratio and bilinear
interpolation (the reference passes none, so torchvision's bilinear even for bicubic CLIP) + a horizontal flip; where
the dataset's family asks for it, TPT's AugMix follows: 3 chains of 1-3 ops drawn uniformly from autocontrast,
equalize, posterize, rotate, solarize, shear x/y, translate x/y, each op drawing its own level
``uniform(0.1, severity)`` (severity 1), chain weights Dirichlet(1, 1, 1) and the crop mixed in with Beta(1, 1), in
floats (not on 8-bit images; :class:`TPTAugMix` says why mixing before the normalisation is the reference's mix).
At severity 1 that gives rotations of 0-2 degrees, shears up to 0.03, translations of 0-7 px at 224 px, solarize
thresholds 231-254 and posterize to 4 bits. Translations are in pixels in the reference (``int(level * 224 / 3 /
10)``); here that integer is scaled by ``size / 224`` so that at any model size they cover the same fraction of the
image (0-1 px in steps of 1/7, bilinear, at the world's 32 px); the other magnitudes do not depend on the size.
torchvision's ``AugMix(severity=1)`` is not this: its magnitude bins make severity 1 always the weakest magnitude
(no rotation, shear or translation, solarize at 255), and it mixes 8-bit images.

Which datasets get AugMix (``augmix: auto``) and the other per-family defaults follow the references' scripts, by the
family of the dataset (:func:`dataset_family`):

- ``imagenet``: ImageNet and its variants; on the embedded world ``shapes`` (the ImageNet analogue) and each of its
  test-only shifts (world datasets whose ``source`` is ``shapes``: they mirror ImageNet-V2/-Sketch/-A/-R). TPT: crop +
  flip only (its ``augmix=len(set_id) > 1`` is off for the one-letter ImageNet sets); C-TPT: AugMix on and λ = 20
  (``test_tpt_ctpt_ds.sh``: ``--I_augmix --lambda_term 20``).
- ``fine_grained``: everything else, real or world (``patterns``, ``counts``) or a user folder, as TPT's rule puts
  every non-ImageNet set there. TPT: AugMix; C-TPT: AugMix and λ = 50 (``test_tpt_ctpt_fg.sh``).

Randomness is seeded per image from (seed, the image's path), not from its position, so a prediction never depends
on the order of the test set or on how it is sharded across ranks (TPT's shuffled loader with seed 0 does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from promptkd.data.benchmarks import BENCHMARKS
from promptkd.data.items import DataError, Datum, load_rgb
from promptkd.data.transforms import eval_transform, seeded_cpu_rng

__all__ = [
    "AUGMIX_OPS",
    "FINE_GRAINED",
    "TPTAugMix",
    "TTAViewDataset",
    "ViewConfig",
    "apply_op",
    "check_image_sizes",
    "dataset_family",
    "dataset_settings",
    "image_seed",
    "min_image_side",
    "op_parameter",
    "to_floats",
]

Family = Literal["imagenet", "fine_grained"]

#: TPT's "fine-grained" benchmarks get AugMix views; ImageNet and its variants only crop + flip (TPT ``get_dataset``).
FINE_GRAINED = frozenset(name for name in BENCHMARKS if not name.startswith("imagenet"))

#: the reference's op list (``augmix_ops.augmentations``: no colour/contrast/brightness/sharpness, which overlap
#: ImageNet-C)
AUGMIX_OPS = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
AUGMIX_SEVERITY = 1
#: image side the reference's pixel magnitudes (translations) are written for (``augmix_ops.IMAGE_SIZE``)
REFERENCE_SIZE = 224


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def dataset_family(name: str) -> Family:
    """``imagenet`` for ImageNet, its variants, world ``shapes`` and its shifts; ``fine_grained`` for the rest."""
    key = _key(name)
    if key.startswith("imagenet"):
        return "imagenet"
    try:
        from promptkd.data.world import WORLD_DATASETS
    except ImportError:  # the world is optional for real benchmarks
        return "fine_grained"
    for spec in WORLD_DATASETS.values():
        if key in (_key(spec.name), _key(spec.split_name)):
            return "imagenet" if (spec.source or spec.name) == "shapes" else "fine_grained"
    return "fine_grained"


def dataset_settings(settings: Any, dataset: str) -> Any:
    """A method's settings on ``dataset``: every setting left unset (``augmix: auto``, a ``None``) takes the value
    its reference's scripts use on the dataset's family; anything the user set (preset or ``--set``) is kept.

    TPT's rule (AugMix on the fine-grained family only) applies to every method; a settings class refines it with a
    ``family_defaults(family) -> dict`` static method (C-TPT: AugMix everywhere, λ 50 / 20).
    """
    family = dataset_family(dataset)
    defaults: dict[str, Any] = {"augmix": "on" if family == "fine_grained" else "off"}
    refine = getattr(type(settings), "family_defaults", None)
    if refine is not None:
        defaults.update(refine(family))
    unset = {k: v for k, v in defaults.items() if hasattr(settings, k) and getattr(settings, k) in (None, "auto")}
    return dataclasses.replace(settings, **unset) if unset else settings


# ----------------------------------------------------------------------------------------------------------------------
# TPT's AugMix (written from the reference's rules, drawing from torch's generator so the per-image seed covers it)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _signed(value: float) -> float:
    """The reference negates a magnitude when a uniform draw exceeds 0.5."""
    return -value if float(torch.rand(())) > 0.5 else value


def op_parameter(op: str, size: int, severity: float = AUGMIX_SEVERITY) -> float:
    """Draw the parameter of ``op`` as the reference does at ``severity`` (level ~ uniform(0.1, severity), scaled to
    the op's maximum / 10): posterize -> bits kept, solarize -> threshold, rotate -> degrees, shear -> factor,
    translate -> pixels at side ``size``; 0 for the parameter-free ops."""
    if op in ("autocontrast", "equalize"):
        return 0.0
    level = _uniform(0.1, severity)
    if op == "posterize":
        return float(4 - int(level * 4 / 10))
    if op == "solarize":
        return float(256 - int(level * 256 / 10))
    if op == "rotate":
        return _signed(float(int(level * 30 / 10)))
    if op in ("shear_x", "shear_y"):
        return _signed(level * 0.3 / 10)
    if op in ("translate_x", "translate_y"):
        return _signed(int(level * (REFERENCE_SIZE / 3) / 10) * size / REFERENCE_SIZE)
    raise ValueError(f"unknown AugMix op {op!r}; expected one of {', '.join(AUGMIX_OPS)}")


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)


_APPLY: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "autocontrast": lambda image, _: ImageOps.autocontrast(image),
    "equalize": lambda image, _: ImageOps.equalize(image),
    "posterize": lambda image, bits: ImageOps.posterize(image, int(bits)),
    "solarize": lambda image, threshold: ImageOps.solarize(image, int(threshold)),
    "rotate": lambda image, degrees: image.rotate(degrees, resample=Image.Resampling.BILINEAR),
    "shear_x": lambda image, s: _affine(image, (1, s, 0, 0, 1, 0)),
    "shear_y": lambda image, s: _affine(image, (1, 0, 0, s, 1, 0)),
    "translate_x": lambda image, t: _affine(image, (1, 0, t, 0, 1, 0)),
    "translate_y": lambda image, t: _affine(image, (1, 0, 0, 0, 1, t)),
}


def apply_op(image: Image.Image, op: str, value: float) -> Image.Image:
    """Apply ``op`` with the parameter :func:`op_parameter` drew (bilinear resampling, black fill, as the reference)."""
    return _APPLY[op](image, value)


def to_floats(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images -> [n, 3, H, W] in [0, 1], the values ``ToTensor`` gives, converted in one go."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255)


class TPTAugMix:
    """TPT's ``augmix()`` after the crop: ``m · clean + (1 - m) · Σ_i w_i · chain_i`` in floats, w ~ Dirichlet(1, 1,
    1), m ~ Beta(1, 1), each chain 1-3 ops drawn uniformly (with replacement).

    Returns the mix in [0, 1] floats; the caller normalises. The reference mixes the normalised tensors, which is the
    same: normalisation is affine and the mixing weights sum to 1 (to float rounding, ~1e-7), and normalising one
    mix instead of four images is what keeps 64 views at 224 px affordable.
    """

    def __init__(self, size: int, severity: float = AUGMIX_SEVERITY):
        self.size = int(size)
        self.severity = severity
        self.width, self.max_depth = 3, 3
        self.weights = torch.distributions.Dirichlet(torch.ones(self.width))
        self.mix = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0))

    def chain(self, image: Image.Image) -> Image.Image:
        for _ in range(int(torch.randint(1, self.max_depth + 1, ()))):
            op = AUGMIX_OPS[int(torch.randint(len(AUGMIX_OPS), ()))]
            image = apply_op(image, op, op_parameter(op, self.size, self.severity))
        return image

    def coefficients(self) -> torch.Tensor:
        """[1 + width] weights of (clean, chain 1, ..., chain width): m, (1 - m) · w (drawn as the reference: w, m)."""
        weights, m = self.weights.sample(), self.mix.sample()
        return torch.cat([m.view(1), (1 - m) * weights])

    def __call__(self, crop: Image.Image) -> torch.Tensor:
        coefficients = self.coefficients()
        images = to_floats([crop, *(self.chain(crop) for _ in range(self.width))])
        return torch.einsum("k,kchw->chw", coefficients, images)


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
        self.crop = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(config.min_scale, 1.0), interpolation=InterpolationMode.BILINEAR),
                T.RandomHorizontalFlip(),
            ]
        )
        self.mean, self.std = tuple(preprocess.mean), tuple(preprocess.std)
        self.augmix = TPTAugMix(size)

    def __len__(self) -> int:
        return len(self.items)

    def views(self, image: Image.Image, key: str) -> torch.Tensor:
        config = self.config
        with seeded_cpu_rng(image_seed(config.seed, key)):
            crops = [self.crop(image) for _ in range(config.n_views - 1)]
            if config.augmix:
                floats = torch.stack([self.augmix(crop) for crop in crops]) if crops else None
            else:
                floats = to_floats(crops) if crops else None
        views = [self.base(image).unsqueeze(0)]
        if floats is not None:
            views.append(TF.normalize(floats, self.mean, self.std))
        return torch.cat(views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        return self.views(load_rgb(item.path), item.path), int(item.label), index
