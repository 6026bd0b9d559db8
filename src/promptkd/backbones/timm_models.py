"""Any timm image model as a distillation student (``timm:NAME``): its pooled features, nothing hand-written.

PromptKD's student is a prompted CLIP image tower; a practitioner who distils to deploy wants the model their device
runs best (a MobileNet, an EfficientNet, a small ResNet or ViT). :func:`load_timm_backbone` builds it with timm
(``num_classes=0``: the model returns its pooled features), checks that those features can be read, and wraps it
in an :class:`ImageBackbone` so the engine, checkpoints and deployment treat it like a CLIP student.

Weights: a timm pretrained tag (``--student-pretrained a1_in1k`` for ``timm:resnet18``; from timm's cache, offline
here), a local weight file (its classifier is dropped, the rest loads strictly), or ``random`` (asked for, never a
default). Input: the teacher's image size and statistics unless pretrained weights bring their own statistics;
ViT-like models are built at that size (``img_size``), and ``kwargs`` (e.g. ``patch_size=4``) reach
``timm.create_model``; all of it is recorded in the spec so a checkpoint rebuilds the same model.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptkd.backbones.types import Backbone, BackboneError, BackboneSpec, PreprocessInfo

__all__ = ["TIMM_PREFIX", "ImageBackbone", "is_timm_name", "load_timm_backbone"]

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
RANDOM = "random"


def is_timm_name(name: str | None) -> bool:
    return bool(name) and str(name).startswith(TIMM_PREFIX)


class _ImageOnly(nn.Module):
    """Holds the timm model as ``.visual`` (where a CLIP keeps its image tower)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


@dataclass
class ImageBackbone(Backbone):
    """A timm image model: no text tower; ``embed_dim`` is the width of its pooled features (probed)."""

    feature_dim: int = 0

    @property
    def embed_dim(self) -> int:  # type: ignore[override]
        return self.feature_dim

    @property
    def vision_width(self) -> int:  # type: ignore[override]
        return self.feature_dim

    @property
    def vision_layers(self) -> int:  # type: ignore[override]
        return 0

    @property
    def text_width(self) -> int:  # type: ignore[override]
        raise BackboneError(f"{self.spec.model_name} is an image model: it has no text tower.")

    text_layers = text_width  # type: ignore[assignment]
    context_length = text_width  # type: ignore[assignment]

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return int(self.preprocess.size)

    @property
    def patch_size(self) -> int:  # type: ignore[override]
        return 0

    def describe(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "feature_dim": self.feature_dim, "image_size": self.image_size}


def _timm_name(model_name: str) -> str:
    import timm

    name = model_name[len(TIMM_PREFIX) :] if is_timm_name(model_name) else model_name
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else ""
        raise BackboneError(
            f'timm has no model {name!r}.{hint} List them with: python -c "import timm; print(timm.list_models())".'
        )
    return name


def _cached_file(cfg: dict[str, Any]) -> str | None:
    """The local copy of a pretrained tag's weights (Hugging Face or torch hub cache), or None: nothing is fetched."""
    import os

    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            if filename:
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str):
                    return found
    url = cfg.get("url")
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if os.path.isfile(path):
            return path
    return cfg.get("file") if cfg.get("file") and os.path.isfile(cfg["file"]) else None


def _create(
    name: str, image_size: int | None, kwargs: dict[str, Any], pretrained_tag: str | None, file: str | None
) -> nn.Module:
    import timm

    full = f"{name}.{pretrained_tag}" if pretrained_tag else name
    options = dict(kwargs)
    if file:  # read the cached copy directly: no network request at all
        options["pretrained_cfg_overlay"] = {"file": file}
    if image_size is not None and "img_size" not in options:
        options["img_size"] = image_size
    try:
        return timm.create_model(full, pretrained=bool(pretrained_tag), num_classes=0, **options)
    except TypeError:
        if "img_size" in kwargs or image_size is None:
            raise
        options.pop("img_size")  # a CNN takes any input size
        return timm.create_model(full, pretrained=bool(pretrained_tag), num_classes=0, **options)


def _load_file(model: nn.Module, path: str) -> str:
    """Load a local weight file strictly (its classifier, if any, dropped); returns the file's sha256."""
    from promptkd.backbones.files import WeightFileError, read_weight_file
    from promptkd.checkpoints import CheckpointError, check_state_fits

    try:
        weights = read_weight_file(path, allow_torchscript=False, compute_hash=True)
    except WeightFileError as error:
        raise BackboneError(str(error)) from error
    state = dict(weights.state_dict)
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    expected = model.state_dict()
    try:
        check_state_fits(expected, state, path)
    except CheckpointError as error:
        raise BackboneError(f"{path} does not fit this timm model:\n{error}") from error
    model.load_state_dict(state, strict=True)
    return str(weights.sha256)


def _probe_features(model: nn.Module, name: str, size: int) -> int:
    """The width of the pooled features (read from a forward pass: ``num_features`` can differ, e.g. MobileNetV3)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size))
    except Exception as error:  # any failure here means the model cannot serve as a student at this size
        raise BackboneError(
            f"timm model {name!r} cannot run on {size}x{size} images ({type(error).__name__}: {error}); try another "
            "model, or pass an input size it accepts (e.g. --student-kwargs img_size=224)."
        ) from error
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BackboneError(
            f"timm model {name!r} does not return pooled features (got {shape} for 2 images; expected [2, F]); "
            "choose a classification model with a pooled head."
        )
    return int(out.shape[1])


def load_timm_backbone(
    model_name: str,
    pretrained: str | None,
    *,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    announce_random: bool = True,
) -> ImageBackbone:
    """Build ``timm:NAME`` with ``pretrained`` = a timm tag, a weight file, or ``"random"`` (see the module docstring).

    ``image_size``/``mean``/``std`` default to the teacher's (given by the caller) or else timm's pretrained config.
    ``announce_random=False`` when a checkpoint's weights replace the random ones right after.
    """
    name = _timm_name(model_name)
    kwargs = dict(kwargs or {})
    if not pretrained:
        raise BackboneError(
            f"say which weights the student {TIMM_PREFIX}{name} starts from: --student-pretrained TAG (a timm "
            "pretrained tag in the local cache), a weight file, or 'random' (initialised from scratch)."
        )
    import timm

    tag = None
    source = "random"
    if pretrained != RANDOM and not Path(pretrained).expanduser().exists():
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
        if pretrained not in tags:
            close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise BackboneError(
                f"{pretrained!r} is neither a weight file nor a timm pretrained tag of {name!r}.{hint} "
                f"Its tags: {', '.join(tags[:8]) or 'none'}."
            )
        tag, source = pretrained, "tag"
    cfg = timm.get_pretrained_cfg(f"{name}.{tag}" if tag else name)
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    size = int(image_size or (cfg_dict.get("input_size") or (3, 224, 224))[-1])
    cached = _cached_file(cfg_dict) if tag else None
    if tag and cached is None:
        raise BackboneError(
            f"timm's pretrained weights {name}.{tag} are not in the local cache, and promptkd does not download "
            f"them. On a connected machine run python -c \"import timm; timm.create_model('{name}.{tag}', "
            'pretrained=True)" and copy ~/.cache/huggingface here, or pass a weight file with --student-pretrained '
            "FILE."
        )
    try:
        model = _create(name, size if image_size else None, kwargs, tag, cached)
    except Exception as error:  # timm raises many types for arguments a model does not take
        raise BackboneError(f"timm cannot build {name!r} with {kwargs or 'its defaults'}: {error}") from error
    file_hash = None
    if source == "random" and pretrained != RANDOM:
        file_hash = _load_file(model, str(Path(pretrained).expanduser()))
        source = "file"
    if source == "random" and announce_random:
        logger.warning("student %s%s starts from RANDOM weights (asked for with 'random')", TIMM_PREFIX, name)
    if tag:  # pretrained weights expect their own statistics
        mean, std = tuple(cfg_dict.get("mean") or mean or ()), tuple(cfg_dict.get("std") or std or ())
    mean = tuple(mean or cfg_dict.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(std or cfg_dict.get("std") or (0.229, 0.224, 0.225))
    feature_dim = _probe_features(model, name, size)
    options = {"image_size": size, "mean": list(mean), "std": list(std), "kwargs": kwargs}
    spec = BackboneSpec(
        model_name=TIMM_PREFIX + name,
        pretrained=str(pretrained),
        source=source,
        quick_gelu=False,
        quick_gelu_reason="not a CLIP (timm image model)",
        file_sha256=file_hash,
        options=options,
    )
    preprocess = PreprocessInfo(size, mean, std, str(cfg_dict.get("interpolation") or "bicubic"), "shortest")
    wrapper = _ImageOnly(model).to(device)
    return ImageBackbone(wrapper, None, spec, preprocess, precision, feature_dim=feature_dim)


def timm_options(spec: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`load_timm_backbone` recorded in a spec (``options``)."""
    options = dict(spec.get("options") or {})
    return {
        "image_size": options.get("image_size"),
        "mean": tuple(options["mean"]) if options.get("mean") else None,
        "std": tuple(options["std"]) if options.get("std") else None,
        "kwargs": dict(options.get("kwargs") or {}),
    }
