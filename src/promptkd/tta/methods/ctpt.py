"""C-TPT (Yoon et al., ICLR 2024; hee-suk-yoon/C-TPT): TPT minus λ · ATFD, the average distance of the normalised
class text features from their centroid; more dispersed text features give better-calibrated predictions (λ = 50
for fine-grained sets, 20 for natural distribution shift)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from promptkd.tta.base import AdaptContext, TTAConfig, TTAMethod, register_tta_method
from promptkd.tta.losses import marginal_entropy, text_feature_dispersion
from promptkd.tta.model import PromptParams


@dataclass
class CTPTConfig(TTAConfig):
    dispersion_weight: float = field(default=50.0, metadata={"help": "λ of the ATFD term (50 fine-grained, 20 shift)"})


@register_tta_method
class CTPT(TTAMethod):
    name: ClassVar[str] = "ctpt"
    config_class: ClassVar[type[TTAConfig]] = CTPTConfig
    tuned: ClassVar[tuple[str, ...]] = ("ctx",)
    config: CTPTConfig

    def loss(self, params: PromptParams, ctx: AdaptContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        text = self.model.text_features(params)
        entropy = marginal_entropy(self.model.logits(ctx.selected_features(params), text))
        dispersion = text_feature_dispersion(text)
        return entropy - self.config.dispersion_weight * dispersion, {"entropy": entropy, "atfd": dispersion}
