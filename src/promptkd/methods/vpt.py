"""VPT-deep with CLIP's fixed text classifier: the Deep VPT baseline of MaPLe (Khattak et al., CVPR 2023).

Jia et al., "Visual Prompt Tuning" (ECCV 2022), VPT-deep (Sec. 3.2); as run in muzairkhattak/multimodal-prompt-learning
(``trainers/vpt.py``, config ``VPT/vit_b16_c2_ep5_batch4_4.yaml``: 8 tokens, depth 12, SGD lr 0.0025, 5 epochs,
batch 4). The insertion rule is MaPLe's (algorithms.md Sec. 4.1): layer-0 prompts P_0 are appended after
[CLS + patches]; before block i < depth the previous prompt outputs are replaced by P_i; prompts never enter the
pooled CLS output. The text side is fixed: W = features of "a photo of a {c}." computed once (``FixedEmbeddings``):

    logits = s * n(f(x; P_0..P_{J-1})) @ W,    L = CE(logits, y)

Trainable: ``visual.prompts`` [J, n, D] (8 x 12 x 768 = 73,728 values on ViT-B/16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from promptkd.backbones import Backbone
from promptkd.data.templates import DEFAULT_TEMPLATE
from promptkd.methods import register_method
from promptkd.methods.base import Batch, MethodConfig, StepOutput
from promptkd.methods.prompted import check_depth
from promptkd.methods.zeroshot import FixedTextMethod, check_templates, require_labels
from promptkd.prompts import PromptedImageEncoder, UnsupportedModelError, VisualPrompts

__all__ = ["VPT", "VPTConfig"]


@dataclass
class VPTConfig(MethodConfig):
    """Deep VPT (MaPLe repo's ``VPT`` trainer): ``n_tokens`` prompts per layer in the first ``depth`` blocks."""

    n_tokens: int = field(default=8, metadata={"help": "visual prompt tokens per layer (MaPLe VPT config: 8)"})
    depth: int = field(default=12, metadata={"help": "prompted blocks J, at most the image tower's blocks"})
    init_std: float = field(default=0.02, metadata={"help": "prompts start as N(0, init_std^2)"})
    templates: list[str] = field(
        default_factory=lambda: [DEFAULT_TEMPLATE], metadata={"help": "fixed text templates ('{}' = class name)"}
    )

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.depth < 1:
            raise ValueError("n_tokens and depth must be at least 1")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")
        check_templates(self.templates)


@register_method
class VPT(FixedTextMethod):
    """Deep visual prompts in a frozen ViT, scored against fixed hand-crafted text features; cross-entropy."""

    name = "vpt"
    config_class = VPTConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: VPTConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg: VPTConfig = self.config
        encoder = PromptedImageEncoder(self.clip)
        if not encoder.supports_prompts:
            raise UnsupportedModelError(
                f"vpt: {type(self.clip.visual).__name__} image towers cannot take visual prompts; "
                "use an open_clip ViT, or a method without visual prompts (vp, clip_adapter, tip_adapter)."
            )
        check_depth(self.name, "depth", cfg.depth, encoder.n_blocks, "image", backbone)
        object.__setattr__(self, "image_encoder", encoder)  # shares the frozen tower; not a second registered copy
        self.learner.visual = VisualPrompts(cfg.n_tokens, cfg.depth, encoder.width, init_std=cfg.init_std)
        self.learner.to(backbone.device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.image_encoder(images, self.learner.visual()))

    def training_step(self, batch: Batch) -> StepOutput:
        labels = require_labels(batch, self.name)
        loss = F.cross_entropy(self.logits(batch.images), labels)
        return StepOutput(loss)
