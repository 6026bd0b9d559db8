"""Batched image-feature extraction with an optional on-disk cache.

Frozen-backbone evaluations (zero-shot, linear probe, retrieval) spend nearly all their time in the image tower,
and the same test split is encoded again for every template set, every C of a linear probe and every rerun. The
features are therefore cached on disk, keyed by everything that determines them: the model's identity (name,
weights, activation, precision), the ordered file list (paths, labels, sizes, modification times) and the
transform. Unreadable images skipped under ``skip_bad`` are dropped from the result (not replaced by a
neighbour's duplicate) and listed, so a result can report how many images it did not see.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.data
from tqdm.auto import tqdm

from promptkd.data.items import ImageDataset
from promptkd.data.transforms import eval_transform

__all__ = [
    "FEATURE_CACHE_VERSION",
    "FeatureSet",
    "extract_features",
    "feature_cache_key",
    "file_list_hash",
    "model_identity",
]

logger = logging.getLogger(__name__)

#: Bumped when the cache layout or the extraction rule changes, so old caches are ignored.
FEATURE_CACHE_VERSION = 1


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in state-dict order (for weights with no other identity)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(backbone: Any) -> str:
    """A string that changes whenever the features a backbone computes could change.

    Pretrained tags and hashed weight files are identified by the spec; anything else (random initialisation,
    ``local-dir:`` folders, un-hashed files) by hashing the weights themselves. The compute precision is part of it
    because bf16 autocast changes the features.
    """
    spec = backbone.spec.to_dict()
    facts = {k: spec.get(k) for k in ("model_name", "pretrained", "source", "quick_gelu", "file_sha256")}
    facts["precision"] = getattr(backbone, "precision", "fp32")
    if spec.get("source") != "tag" and not spec.get("file_sha256"):
        facts["weights_sha256"] = _weights_hash(backbone.model)
    return _sha256(json.dumps(facts, sort_keys=True))


def file_list_hash(paths: Sequence[str], labels: Sequence[int] | None = None, *, stat: bool = True) -> str:
    """Hash of the ordered (path, label, size, mtime) list; a changed, moved or re-rendered file changes it."""
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        label = labels[i] if labels is not None else -1
        facts = ""
        if stat:
            try:
                st = os.stat(path)
                facts = f"{st.st_size}\t{st.st_mtime_ns}"
            except OSError:
                facts = "missing"
        h.update(f"{path}\t{label}\t{facts}\n".encode())
    return h.hexdigest()


def feature_cache_key(backbone: Any, dataset: ImageDataset, transform: Any = None) -> str:
    """Cache key of (model identity, file list, transform) for a dataset."""
    transform = dataset.transform if transform is None else transform
    parts = {
        "version": FEATURE_CACHE_VERSION,
        "model": model_identity(backbone),
        "files": file_list_hash([dataset.path(i) for i in range(len(dataset))], dataset.labels),
        "transform": repr(transform),
        "skip_bad": bool(dataset.skip_bad),
    }
    return _sha256(json.dumps(parts, sort_keys=True))[:32]


@dataclass
class FeatureSet:
    """Image features in dataset order, with the labels and the indices of the items they belong to.

    ``indices`` are positions in the source dataset; they differ from ``range(N)`` only when unreadable images
    were skipped (their paths are in ``skipped``).
    """

    features: torch.Tensor  # [N, E] float32 on the CPU
    labels: torch.Tensor  # [N] int64 (-1 for unlabelled items)
    indices: torch.Tensor  # [N] int64
    skipped: list[str] = field(default_factory=list)
    from_cache: bool = False

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def normalized(self) -> torch.Tensor:
        """L2-normalised features (what every CLIP classifier compares)."""
        return F.normalize(self.features.float(), dim=-1)


class _Indexed(torch.utils.data.Dataset):
    """Returns (image, label, requested index, loaded index) from a shallow copy of an ImageDataset.

    An ImageDataset with ``skip_bad`` replaces an unreadable item by the next good one; comparing the two
    indices finds those replacements in the main process, whatever the number of workers. The copy shares the
    item list and the ``skipped`` list but never changes the caller's ``return_index`` or transform.
    """

    def __init__(self, dataset: ImageDataset, transform: Any) -> None:
        self.dataset = copy.copy(dataset)
        self.dataset.return_index = True
        self.dataset.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int, int]:
        image, label, loaded = self.dataset[index]
        return image, label, index, loaded


def _cache_paths(cache_dir: str | os.PathLike[str], key: str) -> tuple[Path, Path]:
    folder = Path(cache_dir)
    return folder / f"features-{key}.safetensors", folder / f"features-{key}.json"


def _load_cached(cache_dir: str | os.PathLike[str], key: str) -> FeatureSet | None:
    tensor_path, meta_path = _cache_paths(cache_dir, key)
    if not (tensor_path.is_file() and meta_path.is_file()):
        return None
    from promptkd.checkpoints import CheckpointError, load_tensor_record

    try:
        tensors, meta = load_tensor_record(tensor_path, meta_path)
        if meta.get("key") != key:
            return None
        return FeatureSet(tensors["features"], tensors["labels"], tensors["indices"], list(meta["skipped"]), True)
    except (CheckpointError, KeyError) as error:
        logger.warning("feature cache %s is unreadable (%s); recomputing", tensor_path, error)
        return None


def _save_cached(cache_dir: str | os.PathLike[str], key: str, result: FeatureSet, describe: dict[str, Any]) -> None:
    from promptkd.checkpoints import save_tensor_record

    tensor_path, meta_path = _cache_paths(cache_dir, key)
    try:
        tensors = {"features": result.features, "labels": result.labels, "indices": result.indices}
        save_tensor_record(tensor_path, meta_path, tensors, {"key": key, "skipped": result.skipped, **describe})
    except OSError as error:
        logger.warning("could not write feature cache %s (%s); continuing without it", tensor_path, error)


@torch.no_grad()
def extract_features(
    backbone: Any,
    data: ImageDataset | torch.utils.data.DataLoader,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    desc: str = "image features",
) -> FeatureSet:
    """Encode every image of ``data`` with the backbone's image tower (under its autocast), in dataset order.

    Args:
        backbone: a :class:`~promptkd.backbones.Backbone`.
        data: an :class:`ImageDataset` (no transform: the backbone's eval transform is used), or a DataLoader
            yielding ``(images, labels, ...)``. Only an ImageDataset can be cached and have skipped images dropped.
        cache_dir: folder for the on-disk feature cache; None disables it.

    Returns:
        Unnormalised float32 features on the CPU (call :meth:`FeatureSet.normalized` for L2-normalised ones).
    """
    dataset = data if isinstance(data, ImageDataset) else None
    key = None
    transform = None
    if dataset is not None:
        transform = dataset.transform if dataset.transform is not None else eval_transform(backbone.preprocess)
        if cache_dir is not None:
            key = feature_cache_key(backbone, dataset, transform)
            cached = _load_cached(cache_dir, key)
            if cached is not None:
                logger.info("loaded %d cached image features (%s)", len(cached), desc)
                dataset.skipped.extend(p for p in cached.skipped if p not in dataset.skipped)
                return cached

    if dataset is not None:
        loader = torch.utils.data.DataLoader(
            _Indexed(dataset, transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=backbone.device.type == "cuda",
        )
        total = len(dataset)
    else:
        loader = data  # type: ignore[assignment]
        total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[arg-type]

    model = backbone.model
    was_training = model.training
    model.eval()
    device = backbone.device
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    bad: set[int] = set()
    seen = 0
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=None if progress else True, leave=False) as bar:
            for batch in loader:
                images, batch_labels = batch[0], torch.as_tensor(batch[1])
                if dataset is not None:
                    requested, loaded = torch.as_tensor(batch[2]), torch.as_tensor(batch[3])
                    keep = requested == loaded
                    bad.update(int(i) for i in requested[~keep])
                else:
                    requested = torch.arange(seen, seen + len(batch_labels))
                    keep = torch.ones(len(batch_labels), dtype=torch.bool)
                seen += len(batch_labels)
                with backbone.autocast():
                    out = model.encode_image(images.to(device, non_blocking=True))
                out = out.float().cpu()
                feats.append(out[keep])
                labels.append(batch_labels.long()[keep])
                indices.append(requested.long()[keep])
                bar.update(len(batch_labels))
    finally:
        model.train(was_training)

    embed = int(backbone.embed_dim)
    result = FeatureSet(
        features=torch.cat(feats) if feats else torch.empty(0, embed),
        labels=torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        indices=torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
    )
    if dataset is not None:
        result.skipped = [dataset.path(i) for i in sorted(bad)]
        dataset.skipped.extend(p for p in result.skipped if p not in dataset.skipped)
        if result.skipped:
            logger.warning("%d of %d images were unreadable and skipped (%s)", len(result.skipped), total, desc)
        if key is not None:
            describe = {"model": backbone.spec.to_dict(), "transform": repr(transform), "num": len(result)}
            _save_cached(cache_dir, key, result, describe)  # type: ignore[arg-type]
    return result
