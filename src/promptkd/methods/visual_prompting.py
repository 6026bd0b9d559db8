"""Pixel-space visual prompting (VP) with CLIP's fixed text classifier.

Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale Models" (arXiv 2203.17274, 2022), Sec. 3; reference
code hjbahng/visual_prompting (``models/prompters.py::PadPrompter``, ``main_clip.py``). A learnable frame v of
width p is added to the normalised input image, everything else stays frozen:

    x' = x + v  (v = 0 inside the centre (S-2p) x (S-2p) square),    logits = s * n(f(x')) @ W,    L = CE

The paper uses p = 30 at S = 224 (ViT-B/32); here p = round(S * pad / reference_size), e.g. 4 px at 32 px. Trainable
values: 2*3*p*S + 2*3*p*(S-2p) (69,840 at 224 px, p = 30). The parameters start as N(0, 1) like ``torch.randn``
in the reference. The reference's text template is "This is a photo of a {}" (the default here); it trains with
SGD lr 40, momentum 0.9, no weight decay, batch 256, 1000 epochs and ``utils.cosine_lr``: lr·(s+1)/1000 over the
first 1000 optimizer steps, then a cosine over the remaining ones (preset ``vit_b32_pad30_ep1000_batch256``: train
``warmup_type: open_clip``, ``warmup_steps: 1000``).
Works with any image tower (ViT or ResNet), since only the input changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.backbones import Backbone
from promptkd.config import ConfigError
from promptkd.errors import PromptKDError
from promptkd.methods import register_method
from promptkd.methods.base import Batch, MethodConfig, StepOutput
from promptkd.methods.zeroshot import FixedTextMethod, check_templates, require_labels

__all__ = ["PaddingPrompt", "VisualPrompting", "VisualPromptingConfig", "padding_width"]

VP_TEMPLATE = "This is a photo of a {}"


@dataclass
class VisualPromptingConfig(MethodConfig):
    """VP padding prompt (Bahng et al. 2022): width ``pad`` pixels at ``reference_size``, scaled to the model."""

    pad: int = field(default=30, metadata={"help": "frame width in pixels at reference_size (paper: 30 at 224)"})
    reference_size: int = field(
        default=224, metadata={"help": "image size at which `pad` is given; set it to the model's size for exact px"}
    )
    init_std: float = field(default=1.0, metadata={"help": "frame starts as N(0, init_std^2) (reference: randn)"})
    templates: list[str] = field(
        default_factory=lambda: [VP_TEMPLATE], metadata={"help": "fixed text templates ('{}' = class name)"}
    )

    def __post_init__(self) -> None:
        if self.pad < 1 or self.reference_size < 1:
            raise ValueError("pad and reference_size must be at least 1")
        if self.init_std < 0:
            raise ValueError("init_std must be >= 0")
        check_templates(self.templates)


def padding_width(image_size: int, pad: int, reference_size: int) -> int:
    """p = round(image_size * pad / reference_size), at least 1 px."""
    return max(1, round(image_size * pad / reference_size))


class PaddingPrompt(nn.Module):
    """The learnable frame: ``up``/``down`` [C, p, S] and ``left``/``right`` [C, S-2p, p] (VP's ``PadPrompter``)."""

    def __init__(self, image_size: int, pad: int, channels: int = 3, init_std: float = 1.0):
        super().__init__()
        if 2 * pad >= image_size:
            raise ConfigError(f"vp: a padding of {pad} px leaves no image inside a {image_size} px input")
        inner = image_size - 2 * pad
        self.image_size, self.pad = image_size, pad
        self.up = nn.Parameter(torch.randn(channels, pad, image_size) * init_std)
        self.down = nn.Parameter(torch.randn(channels, pad, image_size) * init_std)
        self.left = nn.Parameter(torch.randn(channels, inner, pad) * init_std)
        self.right = nn.Parameter(torch.randn(channels, inner, pad) * init_std)

    def forward(self) -> torch.Tensor:
        """The full additive prompt v [C, S, S], zero in the centre."""
        inner = self.image_size - 2 * self.pad
        centre = self.left.new_zeros(self.left.shape[0], inner, inner)
        middle = torch.cat([self.left, centre, self.right], dim=2)
        return torch.cat([self.up, middle, self.down], dim=1)


def _input_channels(visual: nn.Module) -> int:
    conv = getattr(visual, "conv1", None)
    return int(conv.in_channels) if isinstance(conv, nn.Conv2d) else 3


@register_method
class VisualPrompting(FixedTextMethod):
    """x' = x + v on the normalised image, then frozen CLIP with fixed text features; cross-entropy on v."""

    name = "vp"
    config_class = VisualPromptingConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: VisualPromptingConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg: VisualPromptingConfig = self.config
        size = backbone.image_size
        pad = padding_width(size, cfg.pad, cfg.reference_size)
        self.learner.padding = PaddingPrompt(size, pad, _input_channels(backbone.visual), cfg.init_std)
        self.learner.to(backbone.device)

    def prompt_images(self, images: torch.Tensor) -> torch.Tensor:
        """x + v, for images already at the model's input size."""
        size = self.learner.padding.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise PromptKDError(
                f"vp: images are {tuple(images.shape[-2:])} but the padding prompt was built for {size}x{size} inputs"
            )
        return images + self.learner.padding().to(images.dtype)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.clip.encode_image(self.prompt_images(images)))

    def training_step(self, batch: Batch) -> StepOutput:
        labels = require_labels(batch, self.name)
        return StepOutput(F.cross_entropy(self.logits(batch.images), labels))
