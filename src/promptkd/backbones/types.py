"""What a loaded backbone is (identity, preprocessing, facts read from the model) and its precision contexts.

Separate from :mod:`promptkd.backbones.loading` so that other model families (timm students) build the same
:class:`Backbone` without importing the open_clip loaders.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import open_clip
import torch
from torch import nn

from promptkd.errors import PromptKDError
from promptkd.precision import PRECISIONS

__all__ = ["Backbone", "BackboneError", "BackboneSpec", "PreprocessInfo", "autocast_for"]


class BackboneError(PromptKDError, RuntimeError):
    """A backbone that cannot be built as asked; the message says what was expected, what was found, what to do."""


@dataclass
class PreprocessInfo:
    """How images must be prepared for a model; read from the model, never assumed."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_model(cls, model: nn.Module) -> PreprocessInfo:
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        if isinstance(size, (list, tuple)):
            size = size[0]
        return cls(
            size=int(size),
            mean=tuple(float(x) for x in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(float(x) for x in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
        )


@dataclass
class BackboneSpec:
    """What identifies a backbone; stored in every checkpoint and run config so a result can be traced."""

    model_name: str
    pretrained: str | None = None
    source: str = "random"  # "tag" | "file" | "local-dir" | "random"
    quick_gelu: bool = False
    quick_gelu_reason: str = ""
    file_sha256: str | None = None
    open_clip_version: str = field(default_factory=lambda: open_clip.__version__)
    options: dict[str, Any] = field(default_factory=dict)  # how a non-CLIP student was built (input size, kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def same_identity(self, other: dict[str, Any]) -> bool:
        """True when ``other`` (a stored spec) names the same architecture, weights and activation."""
        keys = ("model_name", "pretrained", "quick_gelu", "file_sha256")
        return all(other.get(k) == getattr(self, k) for k in keys if other.get(k) is not None or k != "file_sha256")


@dataclass
class Backbone:
    """A loaded open_clip CLIP plus its tokenizer, preprocessing and identity."""

    model: nn.Module
    tokenizer: Any
    spec: BackboneSpec
    preprocess: PreprocessInfo
    precision: str = "fp32"

    # --- facts read from the model -------------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def text_tower(self) -> nn.Module:
        """open_clip keeps the text tower flat on ``CLIP`` and under ``.text`` on ``CustomTextCLIP``."""
        return self.model.text if hasattr(self.model, "text") else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vision_width(self) -> int:
        return int(self.visual.conv1.weight.shape[0]) if hasattr(self.visual, "conv1") else int(self.embed_dim)

    @property
    def vision_layers(self) -> int:
        return len(self.visual.transformer.resblocks) if hasattr(self.visual, "transformer") else 0

    @property
    def text_width(self) -> int:
        return int(self.text_tower.ln_final.weight.shape[0])

    @property
    def text_layers(self) -> int:
        return len(self.text_tower.transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.text_tower, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        if proj is not None:
            return int(proj.shape[1])
        return int(self.text_width)

    @property
    def image_size(self) -> int:
        size = getattr(self.visual, "image_size", self.preprocess.size)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def patch_size(self) -> int:
        size = getattr(self.visual, "patch_size", (0,))
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def grid_size(self) -> tuple[int, int]:
        grid = getattr(self.visual, "grid_size", (0, 0))
        return (int(grid[0]), int(grid[1]))

    @property
    def context_length(self) -> int:
        return int(self.text_tower.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) as a detached scalar: frozen in every method here."""
        return self.model.logit_scale.detach().exp()

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def autocast(self):
        """Context for this backbone's compute precision (fp32 master weights, bf16/fp16 autocast)."""
        return autocast_for(self.precision, self.device)

    def freeze(self) -> Backbone:
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        return self

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "vision_width": self.vision_width,
            "vision_layers": self.vision_layers,
            "text_width": self.text_width,
            "text_layers": self.text_layers,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "context_length": self.context_length,
            "preprocess": asdict(self.preprocess),
        }


def autocast_for(precision: str, device: torch.device | str):
    """Autocast context for a precision name; fp16 on CPU is refused because it is ~17x slower than fp32 here."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type == "cpu":
            raise BackboneError("precision fp16 on the CPU is very slow (no fp16 matmul kernels); use bf16 or fp32.")
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    raise BackboneError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}.")
