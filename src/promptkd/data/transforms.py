"""Image transforms built from a model's :class:`~promptkd.backbones.PreprocessInfo`, never from constants.

Evaluation follows the papers' Dassl test recipe: resize the *shorter* side to the model's input size with the
model's interpolation (aspect ratio kept), centre crop, ``ToTensor``, normalise. The old Dassl ``Resize((s, s))``
squashed the image and cost about a point (CoOp issue #8), so it is only used when the model itself asks for it
(``resize_mode="squash"``). Training uses ``RandomResizedCrop(size, scale=(0.08, 1))`` + horizontal flip, the
recipe of every prompt-learning trainer (Dassl >= 0.5).

Sizes come from the model, so the embedded world's 32 px PNGs and the tiny 32 px models need no special case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from promptkd.errors import PromptKDError

__all__ = [
    "RESIZE_MODES",
    "BatchNormalized",
    "ResizeLongest",
    "build_transform",
    "eval_transform",
    "interpolation_mode",
    "train_transform",
    "transform_key",
]

RESIZE_MODES = ("shortest", "longest", "squash")

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


class TransformError(PromptKDError, ValueError):
    """Preprocessing settings that cannot be turned into a transform."""


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision interpolation for a name as open_clip stores it (``"bicubic"``, ``"bilinear"``, ...)."""
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        raise TransformError(
            f"unknown interpolation {name!r}; expected one of {', '.join(sorted(_INTERPOLATIONS))}"
        ) from None


class ResizeLongest:
    """Resize so the *longer* side equals ``size`` (aspect kept); the centre crop that follows pads with black.

    open_clip's ``resize_mode="longest"`` (letter-boxing); kept here so such models are evaluated as trained.
    """

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> None:
        self.size = int(size)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        scale = self.size / max(width, height)
        new = (max(1, round(height * scale)), max(1, round(width * scale)))
        return F.resize(img, list(new), interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


def _normalize(preprocess: Any) -> T.Normalize:
    return T.Normalize(mean=tuple(preprocess.mean), std=tuple(preprocess.std))


def _sized(transform: T.Compose, size: int) -> T.Compose:
    """Note the model's input size on the transform: datasets warn about images far smaller than it."""
    transform.input_size = int(size)  # type: ignore[attr-defined]
    return transform


def eval_transform(preprocess: Any) -> T.Compose:
    """Resize (shorter side by default) + CenterCrop + ToTensor + Normalize, as the model's preprocessing says."""
    size = int(preprocess.size)
    mode = interpolation_mode(preprocess.interpolation)
    resize_mode = getattr(preprocess, "resize_mode", "shortest") or "shortest"
    if resize_mode == "shortest":
        resize: Any = T.Resize(size, interpolation=mode)
    elif resize_mode == "longest":
        resize = ResizeLongest(size, interpolation=mode)
    elif resize_mode == "squash":
        resize = T.Resize((size, size), interpolation=mode)
    else:
        raise TransformError(f"unknown resize_mode {resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    return _sized(T.Compose([resize, T.CenterCrop(size), T.ToTensor(), _normalize(preprocess)]), size)


def train_transform(preprocess: Any, scale: tuple[float, float] = (0.08, 1.0), flip: bool = True) -> T.Compose:
    """RandomResizedCrop(size, scale=(0.08, 1)) + RandomHorizontalFlip + ToTensor + Normalize (Dassl recipe)."""
    size = int(preprocess.size)
    steps: list[Any] = [
        T.RandomResizedCrop(size, scale=scale, interpolation=interpolation_mode(preprocess.interpolation))
    ]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), _normalize(preprocess)]
    return _sized(T.Compose(steps), int(preprocess.size))


def build_transform(preprocess: Any, train: bool = False) -> T.Compose:
    """The train or eval transform for a model's preprocessing (a ``PreprocessInfo``)."""
    return train_transform(preprocess) if train else eval_transform(preprocess)


class BatchNormalized:
    """An eval transform split in two so that the float conversion and normalisation run once per batch, not once
    per image: at 32 px that is most of the decoding time (measured ~1.45x images/s in one process). Bit-identical to
    the per-image transform: the same divide-by-255, subtract and divide, in float32, element by element.

    An image already at the model's square input size skips the resize and centre crop: both return it unchanged
    there (PIL's resize to the same size is a copy), so :meth:`per_image` goes straight to the tensor (~2x faster
    decoding of pre-sized images, e.g. the world's 32 px PNGs)."""

    def __init__(self, transform: T.Compose):
        *geometry, to_tensor, normalize = transform.transforms
        if not isinstance(to_tensor, T.ToTensor) or not isinstance(normalize, T.Normalize):
            raise TransformError("BatchNormalized needs a transform that ends with ToTensor and Normalize")
        self.geometry = T.Compose([*geometry, T.PILToTensor()])
        self.unchanged_at = _unchanged_size(geometry)
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    def per_image(self, image: Image.Image) -> torch.Tensor:
        """The [3, H, W] uint8 tensor of one RGB image after the resize and crop."""
        if self.unchanged_at is not None and image.size == (self.unchanged_at, self.unchanged_at):
            return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return self.geometry(image)

    @classmethod
    def of(cls, transform: Any) -> BatchNormalized | None:
        """The split of ``transform``, or None when it is not an eval transform of that shape."""
        steps = getattr(transform, "transforms", None)
        if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor):
            return None
        return cls(transform) if isinstance(steps[-1], T.Normalize) else None

    def stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """[B, 3, H, W] float images from the per-image uint8 tensors."""
        return torch.stack(images).float().div_(255).sub_(self.mean).div_(self.std)


def _unchanged_size(geometry: list) -> int | None:
    """The square size at which ``geometry`` (an eval resize, then a centre crop) returns an image unchanged: the
    crop size, when the resize maps a square of that size onto itself; None for any other pipeline."""
    if len(geometry) != 2 or type(geometry[1]) is not T.CenterCrop:
        return None
    resize, crop = geometry
    side = crop.size[0] if crop.size[0] == crop.size[1] else None
    if type(resize) is ResizeLongest:
        return side if resize.size == side else None
    if type(resize) is T.Resize and resize.max_size is None:
        sizes = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        return side if side is not None and all(size == side for size in sizes) else None
    return None


def transform_key(transform: Any) -> str:
    """A stable text description of a transform (its repr), used in feature-cache keys."""
    return repr(transform)


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run a block (e.g. a random transform) with torch's CPU generator seeded to ``seed``, then restore it.

    Only the CPU generator is touched: transforms run on the CPU, and ``torch.manual_seed`` also seeds every
    accelerator, which on a machine without one records a deferred call with its stack trace (about 1.5 ms per call
    with torch 2.14, a third of a distillation step when done per sample).
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)
