"""IVLP: Independent Vision-Language Prompting (the deep V-L baseline of Khattak et al., "MaPLe: Multi-modal Prompt
Learning", CVPR 2023, §4; muzairkhattak/multimodal-prompt-learning ``trainers/independentVL.py``).

Deep prompts on both towers, learnt independently (VPT-deep rule, MaPLe paper Eq. 1-4):

- text: n_t context tokens at positions 1..n_t (initialised from "a photo of a"; with n_t < 4 only the first n_t words
  are learnable, the rest stay fixed words), replaced by fresh learnable tokens before blocks 1..J_t-1;
- image: n_v tokens appended after [CLS + patches] at the input, replaced before blocks 1..J_v-1;

and cross-entropy on ``s · cos(f(x; P_v), g(t_c; P_t))``. Trainable parameters: n_t·W_t·J_t + n_v·W_v·J_v
(30,720 for 2+2 tokens at depth 12 on ViT-B/16; 46,080 for 4+4 at depth 9). ``vision_depth = n_ctx_vision = 0`` gives
the "deep language prompting" baseline (text prompts only).

Depths must fit the backbone's towers (the published depth 9 is for 12-block towers); a deeper setting is an
error, never clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from promptkd.backbones import Backbone
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.prompted import PromptedMethod, check_depth, make_text_learner
from promptkd.prompts import VisualPrompts

__all__ = ["IVLP", "IVLPConfig"]


@dataclass
class IVLPConfig(MethodConfig):
    """IVLP hyper-parameters (reference ``TRAINER.IVLP.*``; defaults from ``extend_cfg``: 2 + 2 tokens, depth 9/9)."""

    n_ctx_text: int = field(default=2, metadata={"help": "text prompt tokens n_t (N_CTX_TEXT)"})
    n_ctx_vision: int = field(default=2, metadata={"help": "visual prompt tokens n_v (N_CTX_VISION); 0 = none"})
    text_depth: int = field(default=9, metadata={"help": "text prompt depth J_t >= 1 (PROMPT_DEPTH_TEXT)"})
    vision_depth: int = field(default=9, metadata={"help": "visual prompt depth J_v (PROMPT_DEPTH_VISION); 0 = none"})
    ctx_init: str = field(
        default="a photo of a", metadata={"help": "init phrase of the text context (CTX_INIT); '' = random"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random prompt init"})

    def __post_init__(self) -> None:
        if self.n_ctx_text < 1 or self.text_depth < 1:
            raise ValueError("n_ctx_text and text_depth must be at least 1 (use the vpt method for vision only)")
        if self.n_ctx_vision < 0 or self.vision_depth < 0:
            raise ValueError("n_ctx_vision and vision_depth must be >= 0")
        if (self.n_ctx_vision == 0) != (self.vision_depth == 0):
            raise ValueError("set both n_ctx_vision and vision_depth to 0 for text-only prompting, or both >= 1")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")


@register_method
class IVLP(PromptedMethod):
    """IVLP: independent deep text prompts (``learner.text``) and deep visual prompts (``learner.visual``)."""

    name: ClassVar[str] = "ivlp"
    config_class: ClassVar[type[MethodConfig]] = IVLPConfig
    config: IVLPConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: IVLPConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        check_depth(self.name, "text_depth", cfg.text_depth, self.text_encoder.n_blocks, "text", backbone)
        self.learner.text = make_text_learner(
            self.name,
            self.text_encoder,
            backbone,
            classnames,
            n_ctx=cfg.n_ctx_text,
            init=cfg.ctx_init.strip() or None,
            deep_depth=cfg.text_depth,
            init_std=cfg.init_std,
        )
        if cfg.vision_depth > 0:
            width = self.image_encoder.width  # raises UnsupportedModelError for towers without prompts (ResNet)
            check_depth(self.name, "vision_depth", cfg.vision_depth, self.image_encoder.n_blocks, "image", backbone)
            self.learner.visual = VisualPrompts(cfg.n_ctx_vision, cfg.vision_depth, width, init_std=cfg.init_std)
        self.learner.to(backbone.device)

    def visual_prompts(self) -> torch.Tensor | None:
        return self.learner.visual.prompts if self.config.vision_depth > 0 else None
