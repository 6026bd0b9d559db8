"""TPT (Shu et al., NeurIPS 2022; azshue/TPT ``tpt_classification.py``): minimise the marginal entropy of the
confident views' averaged prediction by tuning the text context, one AdamW step (lr 5e-3) from "a photo of a" or
CoOp's context, reset for every test image; predict from the original view. The views are TPT's own (bilinear
random crops + flip, its AugMix on the fine-grained family only: :mod:`promptkd.tta.views`)."""

from __future__ import annotations

from typing import ClassVar

import torch

from promptkd.tta.base import AdaptContext, TTAMethod, register_tta_method
from promptkd.tta.model import PromptParams


@register_tta_method
class TPT(TTAMethod):
    name: ClassVar[str] = "tpt"
    tuned: ClassVar[tuple[str, ...]] = ("ctx",)

    def loss(self, params: PromptParams, ctx: AdaptContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entropy = self.entropy(params, ctx)
        return entropy, {"entropy": entropy}
