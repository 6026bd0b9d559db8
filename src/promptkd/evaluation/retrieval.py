"""Zero-shot image <-> text retrieval: recall@K where each image has several captions (COCO, Flickr30k style).

Metric keys are CLIP_benchmark's: ``image_retrieval_recall@K`` is text -> image (a caption retrieves images; a hit
when its own image is in the top K) and ``text_retrieval_recall@K`` is image -> text (an image retrieves captions;
a hit when any of its captions is in the top K). Similarities are computed in row chunks, so COCO's 5k x 25k
matrix never has to exist at once.

Readers:
- COCO captions JSON: ``{"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}``
  (the embedded world writes ``retrieval/captions_coco.json`` in this format);
- Flickr30k ``results.csv`` (``image_name| comment_number| comment``) and ``results_20130124.token``
  (``<image>#<n>\\t<caption>``).
Every malformed entry raises a :class:`~promptkd.data.items.DataError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from promptkd.data.items import DataError, ImageDataset, check_files
from promptkd.data.transforms import eval_transform
from promptkd.evaluation.features import extract_features
from promptkd.evaluation.zeroshot import encode_texts

__all__ = [
    "DEFAULT_KS",
    "CaptionSet",
    "RetrievalResult",
    "evaluate_retrieval",
    "read_captions",
    "read_coco_captions",
    "read_flickr_captions",
    "retrieval_recall",
]

logger = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
_COCO_SHAPE = '{"images": [{"id": 0, "file_name": "x.jpg"}, ...], "annotations": [{"image_id": 0, "caption": "..."}]}'


@dataclass
class CaptionSet:
    """Images (absolute paths) and captions, with the image index of every caption."""

    images: list[str]
    captions: list[str]
    caption_image: list[int]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.caption_image):
            raise ValueError("captions and caption_image must have the same length")

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "images": len(self.images), "captions": len(self.captions)}


def _default_image_root(annotation: Path, candidates: Sequence[str], first: str | None) -> Path:
    """The first candidate folder next to the annotation file that holds the first listed image."""
    for name in candidates:
        folder = annotation.parent / name
        if folder.is_dir() and (first is None or (folder / first).is_file()):
            return folder
    return annotation.parent


def read_coco_captions(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *, check: bool = True
) -> CaptionSet:
    """Read a COCO captions file; ``file_name`` is relative to ``image_root`` (default: ``images/`` beside it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("caption file not found", path=path, expected=f"a COCO captions JSON file: {_COCO_SHAPE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg})", path=path, line=error.lineno, expected=_COCO_SHAPE) from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise DataError("missing the 'images' and 'annotations' lists", path=path, expected=_COCO_SHAPE)
    index: dict[Any, int] = {}
    files: list[str] = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DataError(f"images[{i}] is malformed: {image!r}", path=path, expected='{"id": ..., "file_name": ...}')
        if image["id"] in index:
            raise DataError(f"images[{i}] repeats image id {image['id']!r}", path=path, expected="unique image ids")
        index[image["id"]] = len(files)
        files.append(image["file_name"])
    captions: list[str] = []
    owners: list[int] = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise DataError(
                f"annotations[{i}] is malformed: {ann!r}", path=path, expected='{"image_id": ..., "caption": "..."}'
            )
        if ann["image_id"] not in index:
            raise DataError(
                f"annotations[{i}] refers to image id {ann['image_id']!r}, which is not in 'images'",
                path=path,
                expected="every annotation's image_id to be listed in 'images'",
            )
        captions.append(ann["caption"].strip())
        owners.append(index[ann["image_id"]])
    root = (
        Path(image_root)
        if image_root is not None
        else _default_image_root(path, ["images"], files[0] if files else None)
    )
    images = [str((root / f).resolve()) for f in files]
    if check:
        check_files(images, source=path, fix=f"file_name entries are relative to {root}; pass the image folder")
    return CaptionSet(images, captions, owners, source=str(path))


def _flickr_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, image name, caption) from a results.csv or a .token file."""
    rows: list[tuple[int, str, str]] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error})", path=path, expected="a UTF-8 caption file") from error
    is_token = path.suffix == ".token" or (bool(lines) and "\t" in lines[0] and "#" in lines[0].split("\t", 1)[0])
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if is_token:
            head, sep, caption = line.partition("\t")
            name, hash_sign, n = head.rpartition("#")
            if not sep or not hash_sign or not n.strip().isdigit() or not name or not caption.strip():
                raise DataError(
                    f"malformed row: {line[:80]!r}",
                    path=path,
                    line=number,
                    expected="<image name>#<caption number><TAB><caption>",
                    fix="repair or delete the row",
                )
            rows.append((number, name.strip(), caption.strip()))
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        if number == 1 and parts and parts[0].lower() == "image_name":
            continue
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
            raise DataError(
                f"malformed row: {line[:80]!r}",
                path=path,
                line=number,
                expected="image_name| comment_number| comment (three '|'-separated fields, the middle one a number)",
                fix="repair or delete the row (the public Flickr30k results.csv has one row missing a '|')",
            )
        rows.append((number, parts[0], parts[2]))
    return rows


def read_flickr_captions(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *, check: bool = True
) -> CaptionSet:
    """Read Flickr30k ``results.csv`` or a ``.token`` file; images in ``image_root`` (default: beside the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("caption file not found", path=path, expected="a Flickr30k results.csv or .token file")
    rows = _flickr_rows(path)
    if not rows:
        raise DataError("no captions found", path=path, expected="at least one caption row")
    index: dict[str, int] = {}
    captions: list[str] = []
    owners: list[int] = []
    for _, name, caption in rows:
        owners.append(index.setdefault(name, len(index)))
        captions.append(caption)
    names = list(index)
    root = (
        Path(image_root)
        if image_root is not None
        else _default_image_root(path, ["flickr30k-images", "flickr30k_images", "images"], names[0])
    )
    images = [str((root / n).resolve()) for n in names]
    if check:
        check_files(images, source=path, fix=f"image names are relative to {root}; pass the image folder")
    return CaptionSet(images, captions, owners, source=str(path))


def read_captions(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None, *, check: bool = True
) -> CaptionSet:
    """COCO JSON for ``.json`` files, Flickr30k format otherwise."""
    if Path(path).suffix.lower() == ".json":
        return read_coco_captions(path, image_root, check=check)
    return read_flickr_captions(path, image_root, check=check)


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways from (normalised or not) features; images without captions only act as distractors."""
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    owner = torch.as_tensor(caption_image, dtype=torch.long)
    n_img, n_txt = images.shape[0], texts.shape[0]
    if owner.shape[0] != n_txt:
        raise ValueError(f"{n_txt} text features but {owner.shape[0]} caption owners")
    metrics: dict[str, float] = {}

    # text -> image: does the caption's own image rank in the top K images?
    k_img = max(1, min(max(ks), n_img))
    t2i_rank_hits = torch.zeros(n_txt, k_img, dtype=torch.bool)
    for start in range(0, n_txt, chunk):
        top = (texts[start : start + chunk] @ images.T).topk(k_img, dim=1).indices
        t2i_rank_hits[start : start + chunk] = top == owner[start : start + chunk, None]
    # image -> text: does any of the image's captions rank in the top K captions?
    k_txt = max(1, min(max(ks), n_txt))
    i2t_rank_hits = torch.zeros(n_img, k_txt, dtype=torch.bool)
    for start in range(0, n_img, chunk):
        top = (images[start : start + chunk] @ texts.T).topk(k_txt, dim=1).indices
        rows = torch.arange(start, min(start + chunk, n_img))
        i2t_rank_hits[start : start + chunk] = owner[top] == rows[:, None]
    has_caption = torch.bincount(owner, minlength=n_img) > 0
    for k in ks:
        hit_t2i = t2i_rank_hits[:, : min(k, k_img)].any(dim=1).float()
        hit_i2t = i2t_rank_hits[has_caption, : min(k, k_txt)].any(dim=1).float()
        metrics[f"image_retrieval_recall@{k}"] = hit_t2i.mean().item() if n_txt else float("nan")
        metrics[f"text_retrieval_recall@{k}"] = hit_i2t.mean().item() if hit_i2t.numel() else float("nan")
    return metrics


@dataclass
class RetrievalResult:
    """Recall metrics of one retrieval evaluation."""

    metrics: dict[str, float]
    num_images: int
    num_captions: int
    skipped: list[str] = field(default_factory=list)


def evaluate_retrieval(
    backbone: Any,
    captions: CaptionSet,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> RetrievalResult:
    """Zero-shot retrieval with the backbone: encode every image and caption, then :func:`retrieval_recall`.

    Captions of skipped (unreadable) images are dropped together with the image.
    """
    dataset = ImageDataset(captions.images, eval_transform(backbone.preprocess), skip_bad=skip_bad)
    feats = extract_features(
        backbone,
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        progress=progress,
        desc="retrieval images",
    )
    kept = feats.indices.tolist()
    position = {image: i for i, image in enumerate(kept)}
    pairs = [(text, position[o]) for text, o in zip(captions.captions, captions.caption_image) if o in position]
    texts = [t for t, _ in pairs]
    owners = [o for _, o in pairs]
    text_features = encode_texts(backbone, texts, batch_size=text_batch_size, progress=progress)
    metrics = retrieval_recall(feats.features, text_features, owners, ks)
    return RetrievalResult(metrics, num_images=len(kept), num_captions=len(texts), skipped=list(feats.skipped))
