"""Unlabelled images for PromptKD stage II (paper §3.2 and §4.1: the student sees no label).

Sources:

- a benchmark or world dataset's train split with labels dropped (:func:`from_splits`): ``transductive`` takes the
  images of all classes (the paper's base-to-novel and cross-dataset setting), ``inductive`` only those of the base
  half. Labels are read there only to choose which images enter (base classes, per-class caps), never returned;
- a folder of images (:func:`from_folder`), with the class list given separately;
- WebDataset-style tar shards, streamed through the engine (:mod:`promptkd.engine.stream`, lanes of
  :mod:`promptkd.data.shards`): any number of images, split across ranks and workers, resumable at any step.

Caps (the paper's data-size ablation, Fig. 4): ``max_per_class`` K keeps K seeded images per class (needs labels
for counting, so it applies to benchmark splits only); ``max_images`` N keeps N seeded images of any source.
Pitfall 8: the DG variants define train = test; a test split is used for distillation only when asked for
explicitly (``split="test"``), and the source then says so in its notes.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from promptkd.data.items import DataError, DatasetSplits, Datum, ImageDataset

__all__ = [
    "UnlabeledSource",
    "cap_items",
    "decode_rgb",
    "from_folder",
    "from_splits",
    "read_bytes",
    "read_image",
    "unlabeled_dataset",
]

logger = logging.getLogger(__name__)

Mode = Literal["transductive", "inductive"]


@dataclass
class UnlabeledSource:
    """Image paths without labels, the classes the student's logits cover, and what was done to get them."""

    paths: list[str]
    classnames: list[str]
    mode: Mode
    description: str
    notes: list[str] = field(default_factory=list)
    root: str = ""  # the folder the paths are below: image keys (teacher cache) are relative to it

    def keys(self) -> list[str]:
        """A stable name per image (its path below ``root``), e.g. for the teacher cache."""
        return [os.path.relpath(p, self.root) if self.root else os.path.abspath(p) for p in self.paths]

    def summary(self) -> dict[str, Any]:
        return {
            "images": len(self.paths),
            "classes": len(self.classnames),
            "mode": self.mode,
            "source": self.description,
            "notes": list(self.notes),
        }


def _seeded_subset(items: list[Any], n: int, seed: int, key: Callable[[Any], str]) -> list[Any]:
    """n items chosen by a seeded shuffle of the items sorted by ``key`` (independent of input order)."""
    ordered = sorted(items, key=key)
    if n <= 0 or n >= len(ordered):
        return ordered
    random.Random(seed).shuffle(ordered)
    return sorted(ordered[:n], key=key)


def cap_items(items: Sequence[Datum], max_per_class: int = 0, max_images: int = 0, seed: int = 1) -> list[Datum]:
    """At most ``max_per_class`` seeded items per label (0: all), then at most ``max_images`` overall (0: all)."""
    if max_per_class < 0 or max_images < 0:
        raise ValueError("max_per_class and max_images must be >= 0")
    kept: list[Datum] = list(items)
    if max_per_class:
        groups: dict[int, list[Datum]] = {}
        for d in kept:
            groups.setdefault(d.label, []).append(d)
        kept = []
        for label in sorted(groups):
            kept += _seeded_subset(groups[label], max_per_class, seed + label, key=lambda d: d.path)
    if max_images:
        kept = _seeded_subset(kept, max_images, seed, key=lambda d: d.path)
    return kept


def from_splits(
    splits: DatasetSplits,
    *,
    mode: Mode = "transductive",
    split: Literal["train", "test"] = "train",
    max_per_class: int = 0,
    max_images: int = 0,
    seed: int = 1,
) -> UnlabeledSource:
    """A dataset's split as unlabelled images: all classes (transductive) or the base half (inductive)."""
    from promptkd.data.sampling import subsample_classes

    if mode not in ("transductive", "inductive"):
        raise ValueError(f"mode must be 'transductive' or 'inductive', not {mode!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    part = subsample_classes(splits, "base") if mode == "inductive" else splits
    items = part.split(split)
    notes = [f"{mode}: {len(part.classnames)} of {splits.num_classes} classes in the logits"]
    if split == "test":
        notes.append("transductive use of TEST images for distillation (explicitly requested; pitfall 8)")
        logger.warning("%s: distilling on the TEST split's images (labels dropped), as requested", splits.name)
    if not items:
        hint = (
            " It is test-only (the DG variants define train = test); distil on its test images only explicitly "
            "(--unlabeled-split test), and report the run as transductive on test."
            if splits.test_only
            else ""
        )
        raise DataError(
            f"dataset {splits.name!r} has no {split} images for {mode} distillation.{hint}",
            path=splits.root or None,
            expected=f"images in the {split} split",
        )
    kept = cap_items(items, max_per_class, max_images, seed)
    if max_per_class:
        notes.append(f"at most {max_per_class} images per class (seed {seed})")
    if max_images:
        notes.append(f"at most {max_images} images (seed {seed})")
    return UnlabeledSource(
        [d.path for d in kept],  # labels dropped here
        list(part.classnames),
        mode,
        f"{splits.name} {split} split, labels dropped ({len(kept)} of {len(items)} images)",
        notes,
        root=splits.root,
    )


def from_folder(
    root: str | os.PathLike[str],
    classnames: Sequence[str],
    *,
    max_images: int = 0,
    seed: int = 1,
    mode: Mode = "transductive",
) -> UnlabeledSource:
    """Every image below ``root`` (any depth; an empty folder is a DataError), scored over ``classnames``."""
    from promptkd.data.userdata import unlabeled_folder

    if not classnames:
        raise DataError("the class list is empty", expected="one class name per line in the --classnames file")
    paths = unlabeled_folder(root)
    kept = _seeded_subset(paths, max_images, seed, key=lambda p: p) if max_images else paths
    notes = [f"{mode}: folder images scored over {len(classnames)} classes"]
    if max_images:
        notes.append(f"at most {max_images} images (seed {seed})")
    description = f"folder {os.fspath(root)} ({len(kept)} images)"
    return UnlabeledSource(kept, list(classnames), mode, description, notes, root=os.fspath(root))


def unlabeled_dataset(
    source: UnlabeledSource, transform: Callable[[Image.Image], Any] | None, *, skip_bad: bool = False
) -> ImageDataset:
    """(image, -1) pairs for the engine: plain paths, so no label exists to be read."""
    return ImageDataset(source.paths, transform, skip_bad=skip_bad)


# --- images read once, with the fingerprint of their content (teacher cache) -----------------------------------------
def read_bytes(path: str) -> bytes:
    """A file's encoded bytes; a DataError naming it when it is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise DataError(
            "image file does not exist",
            path=path,
            expected="a readable image file",
            fix="restore the file or remove it from the split / list file",
        ) from error
    except OSError as error:
        raise DataError(f"cannot read image ({error.strerror or error})", path=path) from error


def decode_rgb(data: bytes, path: str) -> Image.Image:
    """The image in ``data`` fully decoded in RGB, exactly as :func:`promptkd.data.items.load_rgb` decodes a file."""
    from promptkd.data.items import _LOAD_ERRORS, _to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _to_rgb(im)
    except _LOAD_ERRORS as error:
        raise DataError(
            f"cannot read image ({type(error).__name__}: {error})",
            path=path,
            expected="a readable JPEG/PNG/... image",
            fix="replace the corrupt file, or skip and count unreadable images (--skip-bad; skip_bad=True in Python)",
        ) from error


def read_image(path: str) -> tuple[Image.Image, str]:
    """(RGB image, fingerprint of its encoded bytes) from one read of the file: what binds a teacher-cache entry
    to the image it was computed on, at the cost of hashing bytes already in memory."""
    from promptkd.distill.cache import content_fingerprint

    data = read_bytes(path)
    return decode_rgb(data, path), content_fingerprint(data)
