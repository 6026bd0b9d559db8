"""C-TPT (Yoon et al., ICLR 2024; hee-suk-yoon/C-TPT): TPT minus λ · ATFD, the average distance of the normalised
class text features from their centroid; more dispersed text features give better-calibrated predictions.

Defaults per dataset family as the reference's scripts set them (:func:`promptkd.tta.views.dataset_settings` fills
them in for each dataset unless the user set them): λ = 50 with TPT's views on the fine-grained sets
(``test_tpt_ctpt_fg.sh``), λ = 20 with AugMix views on ImageNet and its shifts (``test_tpt_ctpt_ds.sh``,
``--I_augmix``), so AugMix is on for both families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from promptkd.config import NON_NEGATIVE
from promptkd.tta.base import AdaptContext, TTAConfig, TTAError, TTAMethod, register_tta_method
from promptkd.tta.losses import marginal_entropy, text_feature_dispersion
from promptkd.tta.model import PromptedCLIP, PromptParams

#: λ of the reference's scripts per dataset family (promptkd.tta.views.dataset_family)
FAMILY_WEIGHTS = {"fine_grained": 50.0, "imagenet": 20.0}


@dataclass
class CTPTConfig(TTAConfig):
    dispersion_weight: float | None = field(
        default=None,
        metadata={
            "help": "λ of the ATFD term (unset: 50 on fine-grained sets, 20 on ImageNet-like shifts)",
            "rule": NON_NEGATIVE,
        },
    )

    @staticmethod
    def family_defaults(family: str) -> dict[str, Any]:
        """λ and views of the reference's script for this dataset family (AugMix in both)."""
        return {"augmix": "on", "dispersion_weight": FAMILY_WEIGHTS[family]}


@register_tta_method
class CTPT(TTAMethod):
    name: ClassVar[str] = "ctpt"
    config_class: ClassVar[type[TTAConfig]] = CTPTConfig
    tuned: ClassVar[tuple[str, ...]] = ("ctx",)
    config: CTPTConfig

    def __init__(self, model: PromptedCLIP, config: TTAConfig | None = None, sources: dict[str, Any] | None = None):
        super().__init__(model, config, sources)
        if self.config.dispersion_weight is None:  # λ depends on the dataset: refuse rather than guess
            raise TTAError(
                "ctpt: dispersion_weight (λ) is unset; give it (--set method.dispersion_weight=50) or take the "
                "dataset's default with promptkd.tta.views.dataset_settings(config, dataset)"
            )

    def loss(self, params: PromptParams, ctx: AdaptContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        text = self.model.text_features(params)
        entropy = marginal_entropy(self.model.logits(ctx.selected_features(params), text))
        dispersion = text_feature_dispersion(text)
        return entropy - float(self.config.dispersion_weight) * dispersion, {"entropy": entropy, "atfd": dispersion}
