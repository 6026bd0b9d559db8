"""CoCoOp: Conditional Context Optimization (Zhou, Yang, Loy & Liu, "Conditional Prompt Learning for
Vision-Language Models", CVPR 2022).

Follows KaiyangZhou/CoOp ``trainers/cocoop.py``. A light Meta-Net h (Linear(d_v, d_v/16) -> ReLU ->
Linear(d_v/16, W_t)) turns the normalised image feature into a bias π = h(n(f(x))) added to every context token
(paper §3.2, Eq. 3-5):

    v_m(x) = v_m + π,   t_c(x) = [SOS] [v_1(x)] ... [v_M(x)] [CLASS_c] [.] [EOT],
    p(y = c | x) = softmax_c( s · cos(f(x), g(t_c(x))) )

trained with cross-entropy. d_v is the image feature (embedding) width, W_t the text width.

**Cost.** The prompts depend on the image, so the text tower runs on B·C sequences per training step (one batched
call here, not a Python loop over images) and on C sequences per test image; the author calls it "very expensive"
(about 64x CoOp's GPU memory, CoOp issue #21), hence batch 1 in the published config. At inference the images are
processed in chunks of at most ``eval_text_batch`` text sequences.

Trainable parameters: (d_v·h + h) + (h·W_t + W_t) + M·W_t with h = d_v // 16 (35,360 for ViT-B/16, M = 4).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from promptkd.backbones import Backbone
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.base import Batch, StepOutput
from promptkd.methods.prompted import AttributePromptConfig, PromptedMethod, apply_attributes, make_text_learner

__all__ = ["CoCoOp", "CoCoOpConfig", "MetaNet"]

logger = logging.getLogger(__name__)


@dataclass
class CoCoOpConfig(MethodConfig, AttributePromptConfig):
    """CoCoOp hyper-parameters; defaults are the paper's main config ``vit_b16_c4_ep10_batch1_ctxv1``."""

    n_ctx: int = field(default=4, metadata={"help": "context length M (N_CTX); ignored with ctx_init"})
    ctx_init: str = field(
        default="a photo of a", metadata={"help": "init phrase (CTX_INIT); sets M to its token count; '' = random"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random context init"})
    eval_text_batch: int = field(
        default=2048, metadata={"help": "inference: at most this many text sequences (images x classes) per call"}
    )

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError("n_ctx must be at least 1")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")
        if self.eval_text_batch < 1:
            raise ValueError("eval_text_batch must be at least 1")
        self.check_attributes()


class MetaNet(nn.Sequential):
    """CoCoOp's Meta-Net: ``linear1`` Linear(d_v, d_v/16) -> ``relu`` -> ``linear2`` Linear(d_v/16, W_t)."""

    def __init__(self, feature_dim: int, ctx_dim: int):
        hidden = max(1, feature_dim // 16)
        super().__init__(
            OrderedDict(
                [
                    ("linear1", nn.Linear(feature_dim, hidden)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(hidden, ctx_dim)),
                ]
            )
        )


@register_method
class CoCoOp(PromptedMethod):
    """CoCoOp: image-conditional context ctx + π(x) (see the module docstring)."""

    name: ClassVar[str] = "cocoop"
    config_class: ClassVar[type[MethodConfig]] = CoCoOpConfig
    config: CoCoOpConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: CoCoOpConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        init = cfg.ctx_init.strip() or None
        if init is not None and cfg.n_ctx != CoCoOpConfig.n_ctx:
            logger.info("cocoop: ctx_init %r sets the context length; n_ctx=%d is ignored", init, cfg.n_ctx)
        self.learner.text = make_text_learner(
            self.name,
            self.text_encoder,
            backbone,
            classnames,
            n_ctx=None if init else cfg.n_ctx,
            init=init,
            init_std=cfg.init_std,
        )
        apply_attributes(self, cfg)
        self.learner.meta_net = MetaNet(backbone.embed_dim, backbone.text_width)
        self.learner.to(backbone.device)

    def conditional_logits(self, images: torch.Tensor) -> torch.Tensor:
        """s · cos(f(x_b), g(t_c(x_b))) for every image b and class c: [B, C], one text call over B·C prompts."""
        image = self.image_features(images)  # [B, E]
        text = self.learner.text
        bias = self.learner.meta_net(image)  # [B, W_t]
        # [B, M, W_t]: π_b added to each class-context token; ATPrompt's attribute blocks are not shifted (reference)
        ctx = text.ctx.unsqueeze(0) + bias.unsqueeze(1).to(text.ctx.dtype)
        prompts = text.build(ctx, batched=True)  # [B, C, L, W_t]
        n_img, n_cls, length, width = prompts.shape
        token_ids = text.token_ids.repeat(n_img, 1)  # [B*C, L]
        features = self.text_encoder(prompts.reshape(n_img * n_cls, length, width), token_ids)
        features = F.normalize(features.float(), dim=-1).view(n_img, n_cls, -1)
        with torch.autocast(device_type=image.device.type, enabled=False):  # float32 logits, as cosine_logits
            return self.logit_scale() * torch.einsum("be,bce->bc", image, features)

    def training_step(self, batch: Batch) -> StepOutput:
        labels = self._labels(batch)
        loss = F.cross_entropy(self.conditional_logits(batch.images), labels)
        return StepOutput(loss, {"ce": float(loss.detach())})

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        per_call = max(1, self.config.eval_text_batch // max(1, len(self.classnames)))
        if images.shape[0] <= per_call:
            return self.conditional_logits(images)
        return torch.cat([self.conditional_logits(chunk) for chunk in images.split(per_call)])
