"""Unlabelled images for PromptKD stage II (paper §3.2 and §4.1: the student sees no label).

Sources:

- a benchmark or world dataset's train split with labels dropped (:func:`from_splits`): ``transductive`` takes the
  images of all classes (the paper's base-to-novel and cross-dataset setting), ``inductive`` only those of the base
  half. Labels are read there only to choose which images enter (base classes, per-class caps), never returned;
- a folder of images (:func:`from_folder`), with the class list given separately;
- WebDataset-style tar shards: :class:`TarImages` (uncompressed shards, indexed: random access, works with the
  engine's deterministic sampler and resume) and :class:`TarShardStream` (any shards, streamed once per pass and split
  across ranks and data-loader workers). Only image members (.jpg/.jpeg/.png/...) are read; label members such as
  ``.cls`` or ``.json`` are ignored.

Caps (the paper's data-size ablation, Fig. 4): ``max_per_class`` K keeps K seeded images per class (needs labels
for counting, so it applies to benchmark splits only); ``max_images`` N keeps N seeded images of any source.
Pitfall 8: the DG variants define train = test; a test split is used for distillation only when asked for
explicitly (``split="test"``), and the source then says so in its notes.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.utils.data
from PIL import Image

from promptkd.data.items import DataError, DatasetSplits, Datum, ImageDataset, is_image_file

__all__ = [
    "TarImages",
    "TarShardStream",
    "UnlabeledSource",
    "cap_items",
    "expand_shards",
    "from_folder",
    "from_splits",
    "shard_assignment",
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
    return UnlabeledSource(kept, list(classnames), mode, f"folder {os.fspath(root)} ({len(kept)} images)", notes)


def unlabeled_dataset(
    source: UnlabeledSource, transform: Callable[[Image.Image], Any] | None, *, skip_bad: bool = False
) -> ImageDataset:
    """(image, -1) pairs for the engine: plain paths, so no label exists to be read."""
    return ImageDataset(source.paths, transform, skip_bad=skip_bad)


# --- tar shards -----------------------------------------------------------------------------------------------------
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard paths from WebDataset brace ranges (``shard-{000..009}.tar``), globs, or plain paths; ``::`` or
    a sequence joins several patterns. Missing shards are a DataError."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split("::") if p]
    out: list[str] = []
    for pattern in patterns:
        expanded = [pattern]
        while any(_BRACES.search(p) for p in expanded):
            nxt = []
            for p in expanded:
                m = _BRACES.search(p)
                if m is None:
                    nxt.append(p)
                    continue
                lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
                nxt += [p[: m.start()] + str(i).zfill(width) + p[m.end() :] for i in range(lo, hi + 1)]
            expanded = nxt
        for p in expanded:
            matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                raise DataError(
                    "tar shard not found" if matches else "no tar shard matches the pattern",
                    path=missing[0] if missing else p,
                    expected="WebDataset-style .tar shards (e.g. shards/train-{000000..000009}.tar)",
                )
            out += matches
    if not out:
        raise DataError("no tar shards given", expected="at least one .tar shard")
    return out


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image member ({type(error).__name__}: {error})", path=where) from error


class TarImages(torch.utils.data.Dataset):
    """Image members of uncompressed tar shards, indexed once: ``dataset[i]`` → (image, -1).

    Random access (seek to each member's data) lets the engine's seeded sampler order, split and resume it exactly.
    Compressed shards cannot be indexed; stream them with :class:`TarShardStream`.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        max_images: int = 0,
        seed: int = 1,
    ):
        self.shards = expand_shards(shards)
        self.transform = transform
        entries: list[tuple[int, int, int, str]] = []
        for s, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard, "r:") as tar:
                    for member in tar:
                        if member.isfile() and is_image_file(member.name):
                            entries.append((s, member.offset_data, member.size, member.name))
            except tarfile.ReadError as error:
                raise DataError(
                    f"not an uncompressed tar ({error})",
                    path=shard,
                    expected="an uncompressed .tar shard (random access needs it)",
                    fix="stream compressed shards with TarShardStream, or repack them without compression",
                ) from error
        if not entries:
            raise DataError("the tar shards hold no image members", path=self.shards[0], expected=".jpg/.png members")
        if max_images:
            entries = _seeded_subset(entries, max_images, seed, key=lambda e: f"{e[0]:08d}/{e[3]}")
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, index: int) -> str:
        shard, _, _, member = self.entries[index]
        return f"{self.shards[shard]}:{member}"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        shard, offset, size, _ = self.entries[index]
        with open(self.shards[shard], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        image = _decode(data, self.name(index))
        return (self.transform(image) if self.transform is not None else image), -1


def shard_assignment(
    shards: Sequence[str], rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1
) -> list[str]:
    """The shards one (rank, worker) reads: every (world_size · num_workers)-th shard from its global slot."""
    slots = max(1, world_size) * max(1, num_workers)
    slot = rank * max(1, num_workers) + worker
    return list(shards[slot::slots])


class TarShardStream(torch.utils.data.IterableDataset):
    """Streams image members of tar shards (compressed or not): yields (image, -1).

    Shards are split across ranks (``rank``/``world_size``, default: torch.distributed's) and data-loader workers,
    so every image is read by exactly one (rank, worker) per pass. ``shuffle`` permutes the shard order per ``epoch``
    (call :meth:`set_epoch`). With fewer shards than rank·worker slots some slots get none (a warning).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 1,
        skip_bad: bool = False,
    ):
        super().__init__()
        self.shards = expand_shards(shards)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def my_shards(self) -> list[str]:
        rank, world = self._rank()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        if len(order) < world * workers:
            logger.warning(
                "%d tar shards for %d ranks x %d workers: some readers get no shard", len(order), world, workers
            )
        return shard_assignment(order, rank, world, worker, workers)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        for shard in self.my_shards():
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if not (member.isfile() and is_image_file(member.name)):
                        continue
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    where = f"{shard}:{member.name}"
                    try:
                        image = _decode(handle.read(), where)
                    except DataError:
                        if not self.skip_bad:
                            raise
                        self.skipped.append(where)
                        logger.warning("skipping unreadable tar member %s", where)
                        continue
                    yield (self.transform(image) if self.transform is not None else image), -1
