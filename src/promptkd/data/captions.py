"""Captioned images for contrastive pre-training, read lazily: caption files (JSONL, COCO) and WebDataset shards.

Nothing is held in memory but the list of (image path, captions, label): each image is decoded when a step needs
it, so a corpus of any size trains in constant memory. A sample is ``(image tensor, label, caption tokens)``; its
augmentation and the choice among its captions come from torch's generator, which the engine seeds per (seed,
epoch, index) for files and per position for shards, so a resumed or distributed run draws the same sample.

- ``captions.jsonl``: one ``{"image": "<path>", "caption": "..." | "captions": [...], "label"?: 0, "classname"?: ...}``
  per line, image paths relative to an ``images/`` folder next to the file (the world's and COCO's layout) or to
  the file's folder; lines naming the same image are merged.
- COCO captions JSON: ``images`` (``id``, ``file_name``, optional ``label``/``category_id``/``classname``) and
  ``annotations`` (``image_id``, ``caption``).
- WebDataset shards: ``<key>.jpg|png|...`` with ``<key>.txt`` (one caption a line) or ``<key>.json``
  (``caption``/``captions``, optional ``label``), and an optional ``<key>.cls`` label.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from promptkd.data.items import DataError, Datum, ImageDataset

__all__ = [
    "CaptionCorpus",
    "CaptionDataset",
    "CaptionViews",
    "is_shard_pattern",
    "resolve_caption_file",
    "shard_companion",
]

logger = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], torch.Tensor]


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
    with open(path, "rb") as f:  # decoded line by line: a Latin-1 line is named, not a UnicodeDecodeError
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError("not UTF-8 text", path=path, line=number, fix="save the file as UTF-8") from None
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
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", path=path, fix="save the file as UTF-8") from None
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


def _merge(entries: list[_Entry]) -> list[_Entry]:
    """One entry per image (lines naming the same image add their captions)."""
    merged: dict[str, _Entry] = {}
    for e in entries:
        if e.image in merged:
            merged[e.image].captions.extend(c for c in e.captions if c not in merged[e.image].captions)
        else:
            merged[e.image] = _Entry(e.image, list(e.captions), e.label, e.classname, e.where)
    return list(merged.values())


def _where(e: _Entry) -> str:
    return f"line {e.where}" if isinstance(e.where, int) else str(e.where)


def _image_root(caption_file: Path) -> Path:
    """World and COCO layouts keep paths relative to an ``images/`` folder next to the caption file."""
    images = caption_file.parent / "images"
    return images if images.is_dir() else caption_file.parent


@dataclass
class CaptionCorpus:
    """The index of a caption file: image paths (absolute), their captions and labels; no pixels.

    Attributes:
        paths: absolute image paths.
        captions: the captions of each image (one is drawn per visit when there are several).
        labels: class label per image, ``-1`` where the file has none.
        classnames: class name of each label, empty when unknown.
        source: the caption file.
    """

    paths: list[str]
    captions: list[list[str]]
    labels: list[int]
    classnames: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not (len(self.paths) == len(self.captions) == len(self.labels)):
            raise ValueError("paths, captions and labels must have one entry per image")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return len(self) > 0 and all(label >= 0 for label in self.labels)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": len(self),
            "captions": sum(len(c) for c in self.captions),
            "classes": len(self.classnames) if self.classnames else len({k for k in self.labels if k >= 0}),
        }

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *, skip_bad: bool = False
    ) -> CaptionCorpus:
        """Read a ``captions.jsonl`` or COCO captions JSON and check that every image it names exists.

        Image paths are relative to ``image_root``, by default the ``images/`` folder next to the file or else the
        file's folder. ``skip_bad`` (--skip-bad): missing images are warned about and kept, so the dataset skips and
        counts them like any unreadable image.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError("caption file does not exist", path=path, expected="a captions.jsonl or COCO .json file")
        root = Path(image_root) if image_root is not None else _image_root(path)
        items = _merge(_read_jsonl(path) if path.suffix == ".jsonl" else _read_coco(path))
        missing = [e for e in items if not (root / e.image).is_file()]
        if missing and skip_bad:
            logger.warning(
                "%s: %d of %d listed images do not exist (relative to %s); they are skipped and counted",
                path,
                len(missing),
                len(items),
                root,
            )
        elif missing:
            first = missing[0]
            listed = "\n".join(f"    {_where(e)}: {root / e.image}" for e in missing[:10])
            more = f"\n    ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(
                f"{len(missing)} of {len(items)} listed images do not exist (relative to {root}):\n{listed}{more}",
                path=path,
                line=first.where if isinstance(first.where, int) else None,
                expected="every image named in the caption file to exist",
                fix=f"restore the images or fix their paths (relative to {root}: the images/ folder beside the "
                "caption file, else its own folder), or leave them out and count them with --skip-bad",
            )
        labels, classnames = _labels_of(items, path)
        logger.info("%s: %d images with %d captions", path, len(items), sum(len(e.captions) for e in items))
        return cls([str(root / e.image) for e in items], [e.captions for e in items], labels, classnames, str(path))


def _fit(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (size x size x 3): the shorter side resized to ``size`` (bicubic), then centre-cropped, as CLIP."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


@dataclass
class CaptionViews:
    """A pre-training view of an image: CLIP's resize and centre crop, then random flip, zoom and shift (one affine
    resampling, edge pixels fill the border) and pixel noise, normalised with the model's mean and std.

    Randomness comes from torch's global generator, which the engine seeds per sample.
    """

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    hflip: bool = True
    translate: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    noise: float = 0.0

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)  # once, not per image
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    @property
    def input_size(self) -> int:  # read by ImageDataset to warn about (and count) far smaller images
        return self.size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(_fit(image, self.size).copy()).permute(2, 0, 1).float()
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if self.translate or tuple(self.zoom) != (1.0, 1.0):
            lo, hi = self.zoom
            scale = lo + (hi - lo) * float(torch.rand(()))
            # Shift range in normalised [-1, 1] units: the requested fraction plus the slack a zoom-out leaves.
            slack = 2 * self.translate + max(0.0, 1 - scale)
            shift = (2 * torch.rand(2) - 1) * slack
            theta = torch.tensor([[1 / scale, 0.0, -shift[0] / scale], [0.0, 1 / scale, -shift[1] / scale]])
            grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
            x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        if self.noise:
            x = (x + self.noise * torch.randn(x.shape)).clamp(0, 255)
        return (x / 255.0 - self._mean) / self._std


class _TokenCache:
    """Caption -> token row, tokenised once (corpora repeat captions)."""

    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize, self.rows = tokenize, {}

    def __call__(self, caption: str) -> torch.Tensor:
        row = self.rows.get(caption)
        if row is None:
            row = self.rows[caption] = self.tokenize([caption])[0]
        return row


def _pick(captions: Sequence[str]) -> str:
    return captions[int(torch.randint(len(captions), ()))] if len(captions) > 1 else captions[0]


class CaptionDataset(torch.utils.data.Dataset):
    """A :class:`CaptionCorpus` as training samples ``(view, label, caption tokens)``, each image read when needed.

    Unreadable images stop the run with a message naming the file, or with ``skip_bad`` are replaced by the next
    readable one and counted (``skipped``), as for every image dataset of the package.
    """

    def __init__(self, corpus: CaptionCorpus, transform: CaptionViews, tokenize: Tokenize, *, skip_bad: bool = False):
        self.corpus = corpus
        label_of = dict(enumerate(corpus.classnames))
        items = [Datum(p, k, label_of.get(k, "")) for p, k in zip(corpus.paths, corpus.labels)]
        self.images = ImageDataset(items, transform, skip_bad=skip_bad, return_index=True)
        self.tokens = _TokenCache(tokenize)

    def __len__(self) -> int:
        return len(self.corpus)

    @property
    def skipped(self) -> list[str]:
        return self.images.skipped

    @property
    def small(self) -> list[str]:
        return self.images.small

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        view, label, j = self.images[index]  # j: the image actually read (another one when this one was skipped)
        return view, label, self.tokens(_pick(self.corpus.captions[j]))


def _caption_error(sample: Any, problem: str) -> DataError:
    return DataError(
        problem,
        path=sample.where,
        expected="a caption member next to each image: <key>.txt (a caption a line) or <key>.json with 'caption'",
        fix="add the caption, or skip and count such samples (--skip-bad)",
    )


def shard_companion(tokenize: Tokenize) -> Callable[[Any, int], tuple[int, torch.Tensor]]:
    """What a shard sample's companions say: (its label or -1, the tokens of one of its captions).

    The caption is drawn by the caller's seeded generator (the stream seeds it per position)."""
    tokens = _TokenCache(tokenize)

    def companion(sample: Any, position: int) -> tuple[int, torch.Tensor]:
        extras = sample.extras
        meta: dict[str, Any] = {}
        if "json" in extras:
            try:
                meta = json.loads(extras["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise _caption_error(sample, f"its .json member is not valid JSON ({error})") from None
            if not isinstance(meta, dict):
                raise _caption_error(sample, "its .json member is not a JSON object")
        captions = meta.get("captions", meta.get("caption"))
        captions = [captions] if isinstance(captions, str) else captions
        if not captions and "txt" in extras:
            captions = [line.strip() for line in extras["txt"].decode("utf-8", "replace").splitlines() if line.strip()]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise _caption_error(sample, "the image has no caption (no .txt member, no 'caption' in its .json)")
        label = meta.get("label", -1)
        if "cls" in extras:
            try:
                label = int(extras["cls"].decode("utf-8").strip())
            except ValueError:
                raise _caption_error(
                    sample, f"its .cls member is not an integer label: {extras['cls'][:40]!r}"
                ) from None
        if not isinstance(label, int) or isinstance(label, bool):
            raise _caption_error(sample, f"its label must be an integer, got {label!r}")
        with_seed = torch.Generator().manual_seed(position)  # the caption of a position never changes
        caption = captions[int(torch.randint(len(captions), (), generator=with_seed))]
        return label, tokens(caption)

    return companion


def is_shard_pattern(data: str | os.PathLike[str]) -> bool:
    """A WebDataset shard list (``shards/{000..009}.tar``, a glob, or a .tar file) rather than a caption file."""
    text = os.fspath(data)
    return any(text.endswith(s) for s in (".tar", ".tar.gz", ".tgz")) or ("{" in text and ".tar" in text)


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
            fix="build the world first (promptkd world), or pass the caption file or shard list itself",
        )
    if not path.is_file():
        raise DataError(
            "no such file or folder",
            path=path,
            expected="a world root, a captions.jsonl, a COCO .json or WebDataset shards ('data/{000..009}.tar')",
        )
    return path
