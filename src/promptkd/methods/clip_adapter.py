"""CLIP-Adapter (visual adapter) with CLIP's fixed text classifier.

Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters" (IJCV 2024, arXiv 2110.04544),
Sec. 3.2 (visual adapter, residual blending); reference code gaopengcuhk/CLIP-Adapter ``clip_adapter.py``.
A bottleneck MLP A on the (unnormalised) image feature f, blended residually with a fixed ratio alpha, then CLIP's
cosine classifier:

    A(f) = ReLU(W_2 ReLU(W_1 f)),   W_1: d -> d/4, W_2: d/4 -> d, no biases
    f' = alpha * A(f) + (1 - alpha) * f            (alpha = 0.2)
    logits = s * n(f') @ W,   L = CE(logits, y)

The reference ``Adapter`` ends with a ReLU as well (``final_relu``, on by default); the paper writes
A(f) = ReLU(f W_1) W_2 with one activation. Trainable: ``adapter.fc.0.weight`` [d/4, d] and ``adapter.fc.2.weight``
[d, d/4] (the reference's key names); 2 d^2 / 4 values (131,072 for d = 512).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.backbones import Backbone
from promptkd.data.templates import DEFAULT_TEMPLATE
from promptkd.methods import register_method
from promptkd.methods.base import Batch, MethodConfig, StepOutput
from promptkd.methods.zeroshot import FixedTextMethod, check_templates, require_labels

__all__ = ["Adapter", "CLIPAdapter", "CLIPAdapterConfig"]


@dataclass
class CLIPAdapterConfig(MethodConfig):
    """CLIP-Adapter's visual adapter: reduction 4, residual ratio alpha = 0.2 (the paper's best on ImageNet)."""

    alpha: float = field(default=0.2, metadata={"help": "residual ratio: f' = alpha * A(f) + (1 - alpha) * f"})
    reduction: int = field(default=4, metadata={"help": "bottleneck width = d / reduction"})
    final_relu: bool = field(default=True, metadata={"help": "ReLU after the second layer, as the reference code"})
    templates: list[str] = field(
        default_factory=lambda: [DEFAULT_TEMPLATE], metadata={"help": "fixed text templates ('{}' = class name)"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must lie in [0, 1]")
        if self.reduction < 1:
            raise ValueError("reduction must be at least 1")
        check_templates(self.templates)


class Adapter(nn.Module):
    """Bottleneck MLP d -> d/reduction -> d, ReLU, no biases (``fc.0`` and ``fc.2`` as in the reference)."""

    def __init__(self, dim: int, reduction: int = 4, final_relu: bool = True):
        super().__init__()
        hidden = max(1, dim // reduction)
        layers: list[nn.Module] = [nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False)]
        if final_relu:
            layers.append(nn.ReLU())
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_method
class CLIPAdapter(FixedTextMethod):
    """Residual feature adapter on the frozen image feature; fixed text classifier; cross-entropy."""

    name = "clip_adapter"
    config_class = CLIPAdapterConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: CLIPAdapterConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg: CLIPAdapterConfig = self.config
        self.learner.adapter = Adapter(int(backbone.embed_dim), cfg.reduction, cfg.final_relu)
        self.learner.to(backbone.device)

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """f' = alpha * A(f) + (1 - alpha) * f on unnormalised image features."""
        alpha = self.config.alpha
        features = features.to(self.learner.adapter.fc[0].weight.dtype)
        return alpha * self.learner.adapter(features) + (1.0 - alpha) * features

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the image tower is frozen; only the adapter needs gradients
            features = self.clip.encode_image(images)
        return self.classify(self.adapt(features))

    def training_step(self, batch: Batch) -> StepOutput:
        labels = require_labels(batch, self.name)
        return StepOutput(F.cross_entropy(self.logits(batch.images), labels))
