"""MaPLe: Multi-modal Prompt Learning (Khattak, Rasheed, Maaz, Khan & Khan, CVPR 2023; muzairkhattak/
multimodal-prompt-learning ``trainers/maple.py``, ``MultiModalPromptLearner``).

Deep text prompts as in IVLP, but the vision prompts are *coupled* to them (paper §3.2, Eq. 5-8): for every layer
k = 0..J-1 a linear map F_k(·) = Linear(W_t, W_v) gives the vision prompt of that layer from the text prompt,

    P_v^k = F_k(P_t^k),   P_t^0 = the context ctx (n × W_t),   P_t^k = compound text prompt k (N(0, 0.02²)),

so there are no independent vision parameters. The context is initialised from "a photo of a": with n = 2 the
prompt is [SOS, ctx_1, ctx_2, "of", "a", CLASS, ".", EOT] ("of a" are fixed words). As in the reference
(``_get_clones``), the deep projections F_1..F_{J-1} start as copies of one freshly initialised layer.

Trainable parameters: J · (n·W_t + W_t·W_v + W_v) (3,555,072 for n = 2, J = 9 on ViT-B/16), almost all in the
coupling maps. The depth must fit both towers; a deeper setting is an error, never clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from promptkd.backbones import Backbone
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.prompted import (
    AttributePromptConfig,
    PromptedMethod,
    apply_attributes,
    check_depth,
    make_text_learner,
)
from promptkd.prompts import MultimodalCoupling

__all__ = ["MaPLe", "MaPLeConfig"]


@dataclass
class MaPLeConfig(MethodConfig, AttributePromptConfig):
    """MaPLe hyper-parameters (reference ``TRAINER.MAPLE.*``: N_CTX 2, CTX_INIT "a photo of a", PROMPT_DEPTH 9)."""

    n_ctx: int = field(default=2, metadata={"help": "prompt tokens n per layer (N_CTX)"})
    depth: int = field(default=9, metadata={"help": "prompt depth J of both towers (PROMPT_DEPTH)"})
    ctx_init: str = field(
        default="a photo of a", metadata={"help": "init phrase of the text context (CTX_INIT); '' = random"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random prompt init"})

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.depth < 1:
            raise ValueError("n_ctx and depth must be at least 1")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")
        self.check_attributes()


@register_method
class MaPLe(PromptedMethod):
    """MaPLe: text prompts ``learner.text`` (ctx + deep) and the coupling ``learner.coupling`` (one Linear a layer)."""

    name: ClassVar[str] = "maple"
    config_class: ClassVar[type[MethodConfig]] = MaPLeConfig
    config: MaPLeConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: MaPLeConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        vision_width = self.image_encoder.width  # raises UnsupportedModelError for towers without prompts
        check_depth(self.name, "depth", cfg.depth, self.text_encoder.n_blocks, "text", backbone)
        check_depth(self.name, "depth", cfg.depth, self.image_encoder.n_blocks, "image", backbone)
        self.learner.text = make_text_learner(
            self.name,
            self.text_encoder,
            backbone,
            classnames,
            n_ctx=cfg.n_ctx,
            init=cfg.ctx_init.strip() or None,
            deep_depth=cfg.depth,
            init_std=cfg.init_std,
        )
        apply_attributes(self, cfg)
        self.learner.coupling = MultimodalCoupling(cfg.depth, self.text_encoder.width, vision_width)
        with torch.no_grad():  # the reference clones one Linear for all deep layers (identical initial maps)
            layers = self.learner.coupling.layers
            for layer in list(layers)[2:]:
                layer.load_state_dict(layers[1].state_dict())
        self.learner.to(backbone.device)

    def visual_prompts(self) -> list[torch.Tensor]:
        # F_0 maps the class context only; ATPrompt's attribute blocks stay text-side (reference ``proj(self.ctx)``)
        return self.learner.coupling(self.learner.text.ctx, self.learner.text.deep)
