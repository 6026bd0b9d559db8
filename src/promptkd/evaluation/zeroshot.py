"""Zero-shot CLIP classification: one template, the dataset's template, or a template ensemble.

The classifier follows CLIP and CLIP_benchmark (``build_zero_shot_classifier``) and CoOp's ``ZeroshotCLIP2``:
for every prompt, encode and L2-normalise; average the normalised prompt features of a class; renormalise. The
result is an [E, C] weight matrix, and logits are ``exp(logit_scale) * n(f_img) @ W``.

Text features are the expensive part for large class lists (a ViT-L/14 text tower over 1000 classes x 80
templates takes minutes on a CPU), so they are cached per (model identity, prompts) in memory and optionally on
disk. Templates use ``"{}"`` for the class name (this package's convention); CLIP_benchmark's ``"{c}"`` is also
accepted, as are callables and CuPL-style per-class prompt lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from promptkd.data.items import Datum, ImageDataset
from promptkd.data.templates import (
    DEFAULT_TEMPLATE,
    IMAGENET_TEMPLATES_SELECT,
    OPENAI_IMAGENET_TEMPLATES,
    dataset_template,
)
from promptkd.data.transforms import eval_transform
from promptkd.errors import PromptKDError
from promptkd.evaluation.features import FeatureSet, extract_features, model_identity
from promptkd.evaluation.metrics import classification_metrics

__all__ = [
    "TEMPLATE_MODES",
    "TemplateError",
    "Templates",
    "ZeroShotResult",
    "build_prompts",
    "clear_text_cache",
    "describe_templates",
    "encode_texts",
    "evaluate_zeroshot",
    "format_prompt",
    "read_template_file",
    "resolve_templates",
    "zeroshot_classifier",
    "zeroshot_logits",
]

logger = logging.getLogger(__name__)

Template = str | Callable[[str], str]
#: A list of templates applied to every class, or CuPL-style prompts per class name.
Templates = Sequence[Template] | Mapping[str, Sequence[str]]

#: Named template sets accepted by :func:`resolve_templates` (anything else is read as a JSON file).
TEMPLATE_MODES = ("single", "dataset", "ensemble", "openai")

_MEMORY_CACHE: OrderedDict[str, torch.Tensor] = OrderedDict()
_MEMORY_CACHE_SIZE = 32


class TemplateError(PromptKDError, ValueError):
    """A template set that cannot be used (unknown name, bad file, no prompt for a class)."""


# ---------------------------------------------------------------------------------------------------------------
# Templates


def format_prompt(template: Template, classname: str) -> str:
    """Fill one template: ``"{}"`` (CoOp), ``"{c}"`` (CLIP_benchmark) or a callable."""
    if callable(template):
        return str(template(classname))
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise TemplateError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")


def build_prompts(classnames: Sequence[str], templates: Templates) -> list[list[str]]:
    """Prompts per class, in class order."""
    if isinstance(templates, Mapping):
        missing = [c for c in classnames if not templates.get(c)]
        if missing:
            raise TemplateError(
                f"the per-class prompt set has no prompts for {len(missing)} classes: {', '.join(missing[:10])}"
            )
        return [[str(p) for p in templates[c]] for c in classnames]
    if isinstance(templates, str):
        templates = [templates]
    if not templates:
        raise TemplateError("empty template list")
    return [[format_prompt(t, c) for t in templates] for c in classnames]


def read_template_file(path: str | os.PathLike[str], dataset: str | None = None) -> Templates:
    """Templates from a JSON file: a list, or CLIP_benchmark's ``{dataset: [templates] or {class: [prompts]}}``.

    With a dict, ``dataset`` selects the entry (falling back to the only entry, then to ``imagenet1k``).
    """
    from promptkd.data.userdata import read_text

    path = Path(path)
    try:
        data = json.loads(read_text(str(path), "template file"))
    except json.JSONDecodeError as error:
        raise TemplateError(f"{path}:{error.lineno}: template file is not valid JSON ({error.msg})") from error
    if isinstance(data, list):
        entry: Any = data
    elif isinstance(data, dict):
        keys = [k for k in (dataset, "imagenet1k") if k is not None and k in data]
        if keys:
            entry = data[keys[0]]
        elif len(data) == 1:
            entry = next(iter(data.values()))
        else:
            raise TemplateError(
                f"{path}: no templates for dataset {dataset!r}; the file has entries for: {', '.join(sorted(data))}"
            )
    else:
        raise TemplateError(f"{path}: expected a JSON list of templates or a {{dataset: templates}} object")
    if isinstance(entry, list) and entry and all(isinstance(t, str) for t in entry):
        return list(entry)
    if isinstance(entry, dict) and all(isinstance(v, list) for v in entry.values()):
        return {str(k): [str(p) for p in v] for k, v in entry.items()}
    raise TemplateError(f"{path}: templates must be a non-empty list of strings or a {{class: [prompts]}} object")


def describe_templates(templates: Templates) -> list[str] | dict[str, list[str]]:
    """A JSON-ready copy of a template set for result files (callables by name)."""
    if isinstance(templates, Mapping):
        return {str(k): [str(p) for p in v] for k, v in templates.items()}
    if isinstance(templates, str):
        return [templates]
    return [t if isinstance(t, str) else getattr(t, "__name__", repr(t)) for t in templates]


def resolve_templates(
    mode: str | Templates,
    dataset: str | None = None,
    *,
    dataset_template_text: str | None = None,
    ensemble: Sequence[str] | None = None,
) -> Templates:
    """The template set for a mode name (:data:`TEMPLATE_MODES`), a JSON file path, or an explicit list.

    ``single`` = ``"a photo of a {}."``; ``dataset`` = the dataset's own template (``dataset_template_text`` if
    given, e.g. from ``DatasetSplits.template``); ``ensemble`` = ``ensemble`` if given (e.g. a world dataset's
    templates), else CoOp's ``ZeroshotCLIP2`` set (7 ImageNet templates + the dataset template); ``openai`` = the
    80 OpenAI ImageNet templates.
    """
    if not isinstance(mode, str):
        return mode
    own = dataset_template_text or (dataset_template(dataset) if dataset else DEFAULT_TEMPLATE)
    if mode == "single":
        return [DEFAULT_TEMPLATE]
    if mode == "dataset":
        return [own]
    if mode == "ensemble":
        if ensemble is not None:
            return list(ensemble)
        return list(IMAGENET_TEMPLATES_SELECT) + ([] if dataset == "imagenet" else [own])
    if mode == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if mode.endswith(".json") or os.path.isfile(mode):
        return read_template_file(mode, dataset)
    raise TemplateError(f"unknown template set {mode!r}; expected one of {', '.join(TEMPLATE_MODES)} or a .json file")


# ---------------------------------------------------------------------------------------------------------------
# Text features


@torch.no_grad()
def encode_texts(backbone: Any, texts: Sequence[str], *, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """L2-normalised text features [N, E] (float32, CPU) of raw strings, in batches, under the backbone's autocast."""
    out: list[torch.Tensor] = []
    model = backbone.model
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="text features", unit="batch", disable=None if progress else True, leave=False):
        ids = backbone.tokenize(list(texts[start : start + batch_size])).to(backbone.device)
        with backbone.autocast():
            features = model.encode_text(ids)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    if not out:
        return torch.empty(0, int(backbone.embed_dim))
    return torch.cat(out)


def _prompts_key(backbone: Any, prompts: list[list[str]]) -> str:
    payload = json.dumps({"model": model_identity(backbone), "prompts": prompts}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def clear_text_cache() -> None:
    """Forget the in-memory text features (e.g. after changing a model's weights in place)."""
    _MEMORY_CACHE.clear()


def _remember(key: str, weights: torch.Tensor) -> None:
    _MEMORY_CACHE[key] = weights
    _MEMORY_CACHE.move_to_end(key)
    while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
        _MEMORY_CACHE.popitem(last=False)


def _disk_paths(cache_dir: str | os.PathLike[str], key: str) -> tuple[Path, Path]:
    return Path(cache_dir) / f"text-{key}.safetensors", Path(cache_dir) / f"text-{key}.json"


def _load_disk(cache_dir: str | os.PathLike[str], key: str) -> torch.Tensor | None:
    tensor_path, _ = _disk_paths(cache_dir, key)
    if not tensor_path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        return load_file(str(tensor_path))["weights"]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("text-feature cache %s is unreadable (%s); recomputing", tensor_path, error)
        return None


def _save_disk(
    cache_dir: str | os.PathLike[str], key: str, weights: torch.Tensor, backbone: Any, classnames: Sequence[str]
) -> None:
    from safetensors.torch import save_file

    from promptkd.checkpoints import atomic_path, atomic_write_text

    tensor_path, meta_path = _disk_paths(cache_dir, key)
    try:
        with atomic_path(tensor_path) as tmp:
            save_file({"weights": weights.contiguous()}, str(tmp))
        meta = {"key": key, "model": backbone.spec.to_dict(), "classnames": list(classnames)}
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    except OSError as error:
        logger.warning("could not write text-feature cache %s (%s); continuing without it", tensor_path, error)


def zeroshot_classifier(
    backbone: Any,
    classnames: Sequence[str],
    templates: Templates = (DEFAULT_TEMPLATE,),
    *,
    batch_size: int = 256,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Zero-shot weights [E, C]: per prompt encode + L2-normalise, average per class, renormalise.

    Args:
        classnames: class names in label order (already cleaned, e.g. "_" replaced by " ").
        templates: templates for every class (``"{}"`` or ``"{c}"`` placeholders, or callables), or a mapping
            class name -> prompts (CuPL style).
        cache_dir: also cache the weights on disk there (keyed by model identity and the exact prompts).
        use_cache: False bypasses the in-memory and disk caches.

    Returns:
        A float32 CPU tensor; each column has unit norm.
    """
    prompts = build_prompts(classnames, templates)
    key = _prompts_key(backbone, prompts) if use_cache else ""
    if use_cache and key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(key)
        return _MEMORY_CACHE[key].clone()
    if use_cache and cache_dir is not None:
        cached = _load_disk(cache_dir, key)
        if cached is not None and cached.shape == (int(backbone.embed_dim), len(classnames)):
            logger.info("loaded cached zero-shot weights for %d classes", len(classnames))
            _remember(key, cached)
            return cached.clone()

    flat = [p for group in prompts for p in group]
    owner = torch.tensor([c for c, group in enumerate(prompts) for _ in group], dtype=torch.long)
    features = encode_texts(backbone, flat, batch_size=batch_size, progress=progress)  # [P, E], normalised
    summed = torch.zeros(len(prompts), features.shape[1], dtype=torch.float32).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=len(prompts)).clamp(min=1).to(summed.dtype)
    weights = F.normalize(summed / counts[:, None], dim=-1).T.contiguous()  # [E, C]
    if use_cache:
        _remember(key, weights)
        if cache_dir is not None:
            _save_disk(cache_dir, key, weights, backbone, classnames)
    return weights.clone()


def zeroshot_logits(backbone: Any, image_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * n(f_img) @ W`` in float32 on the CPU."""
    scale = float(backbone.logit_scale)
    return scale * F.normalize(image_features.float().cpu(), dim=-1) @ weights.float().cpu()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class ZeroShotResult:
    """Metrics of one zero-shot evaluation plus what is needed to reproduce or report it."""

    metrics: dict[str, float]
    num_samples: int
    num_classes: int
    templates: list[str] | dict[str, list[str]]
    skipped: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)  # images far below the input size (upsampled)
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def evaluate_zeroshot(
    backbone: Any,
    data: ImageDataset | Sequence[Datum],
    classnames: Sequence[str],
    templates: Templates = (DEFAULT_TEMPLATE,),
    *,
    weights: torch.Tensor | None = None,
    features: FeatureSet | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    keep_logits: bool = False,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``backbone`` on labelled images.

    Args:
        data: an :class:`ImageDataset` or a list of :class:`Datum` (read with the backbone's eval transform).
        classnames: class names indexed by label.
        weights: a precomputed [E, C] classifier (skips the text tower); else built from ``templates``.
        features: precomputed image features of ``data`` (skips the image tower).
        cache_dir: feature cache folder (image and text features).
        skip_bad: skip unreadable images (they are counted in ``skipped``) instead of failing.
    """
    if weights is None:
        weights = zeroshot_classifier(backbone, classnames, templates, cache_dir=cache_dir, progress=progress)
    if weights.shape[1] != len(classnames):
        raise ValueError(f"classifier has {weights.shape[1]} classes but {len(classnames)} class names were given")
    dataset = (
        data
        if isinstance(data, ImageDataset)
        else ImageDataset(list(data), eval_transform(backbone.preprocess), skip_bad=skip_bad)
    )
    if features is None:
        features = extract_features(
            backbone,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            progress=progress,
            desc="zero-shot images",
        )
    logits = zeroshot_logits(backbone, features.features, weights)
    metrics = classification_metrics(logits, features.labels)
    return ZeroShotResult(
        metrics=metrics,
        num_samples=len(features),
        num_classes=len(classnames),
        templates=describe_templates(templates),
        skipped=list(features.skipped),
        small=[p for p in dataset.small if p not in set(features.skipped)],
        logits=logits if keep_logits else None,
        labels=features.labels if keep_logits else None,
    )
