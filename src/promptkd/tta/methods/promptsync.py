"""PromptSync (Khandelwal, CVPR 2024 Workshops, arXiv 2404.07520): class-aware prototype alignment and
discrimination on MaPLe's multimodal prompts. No public code exists; this is our reading of the paper's
description (``shared/seeds/003``), with every open choice a flag:

- Prototypes (``promptkd tta-stats --prototypes``), offline on a labelled proxy source set with the test classes:
  per class, the mean unnormalised image embedding of its samples and their augmented views (visual prototype),
  ``views_per_class`` normalised augmented-view features, and the base prompts' class text feature (text
  prototype). *Choice*: prototypes live in the joint embedding space (the description averages output tokens).
- Discrimination L_D (meta-train), per sample: the class text features under the sample's current prompts are the
  class prototypes; positives are the class's stored augmented views, negatives the three terms of the description
  (prototype vs other prototypes, own views vs other prototypes, prototype vs other classes' views), with
  s(a, b) = exp(cos(a, b) / τ) and L_D = mean_k −log(pos_k / neg_k).
- Alignment L_A (meta-test), per sample: the test prototype is the mean unnormalised embedding of the confident
  views; for every class, an amplitude term log(1 + |‖x‖ − ‖p_c‖| / ‖p_c‖) and an angular term −log((1 + cos) / 2),
  weighted by the mean class probabilities p̄ of the confident views (detached). *Choice*: on the visual branch
  against the visual prototypes and, with ``text_alignment``, on the text branch (each class text feature against
  its text prototype; unit norms, so only the angle counts).
- Update: meta-train gradient g_D at θ; inner step θ' = θ − α · g_D / (|g_D| + ε) (one fresh-AdamW step, scale-free);
  meta-test gradient g_T of H(p̄) + λ_A · L_A at θ' (first order); g = (g_D + g_T) / 2. ``accumulate='final'``
  (the description): the n iterations walk θ ← θ' and their gradients are averaged into one final AdamW step from
  the initial prompts; ``'every'``: an AdamW step after every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from promptkd.tta.base import AdaptContext, TTAConfig, TTAError, TTAMethod, register_tta_method
from promptkd.tta.losses import amplitude_angle_alignment, marginal_entropy, prototype_discrimination
from promptkd.tta.model import PromptParams
from promptkd.tta.sources import Prototypes


@dataclass
class PromptSyncConfig(TTAConfig):
    lr: float = 4e-2
    inner_lr: float = field(default=4e-2, metadata={"help": "α of the meta-train inner step"})
    discrimination_temperature: float = field(default=0.07, metadata={"help": "τ of L_D"})
    discrimination_weight: float = 1.0
    alignment_weight: float = field(default=1.0, metadata={"help": "λ_A of L_A in the meta-test objective"})
    entropy_weight: float = 1.0
    text_alignment: bool = field(default=True, metadata={"help": "also align class text features to text prototypes"})
    accumulate: Literal["final", "every"] = "final"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.discrimination_temperature <= 0:
            raise ValueError("discrimination_temperature must be positive")


def _grads(loss: torch.Tensor, params: PromptParams) -> PromptParams:
    keys = list(params)
    grads = torch.autograd.grad(loss.sum(), [params[k] for k in keys], allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(keys, grads)}


@register_tta_method
class PromptSync(TTAMethod):
    name: ClassVar[str] = "promptsync"
    config_class: ClassVar[type[TTAConfig]] = PromptSyncConfig
    tuned: ClassVar[tuple[str, ...]] = ("ctx", "deep", "coupling_weight", "coupling_bias")
    needs: ClassVar[tuple[str, ...]] = ("prototypes",)
    config: PromptSyncConfig

    def check_sources(self) -> None:
        prototypes: Prototypes = self.sources["prototypes"]
        prototypes.check(self.model)
        self._protos = prototypes.rows(self.model.classnames)
        device = self.model.device
        self._visual = self._protos.visual.to(device)
        self._views = self._protos.views.to(device)
        self._text = self._protos.text.to(device)

    # --- the two objectives ---------------------------------------------------------------------------------------
    def meta_train_loss(self, params: PromptParams) -> torch.Tensor:
        text = self.model.text_features(params)
        return self.config.discrimination_weight * prototype_discrimination(
            text, self._views, self.config.discrimination_temperature
        )

    def meta_test_loss(self, params: PromptParams, ctx: AdaptContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        raw = ctx.selected_features(params, normalize=False)  # [B, k, E]
        features = torch.nn.functional.normalize(raw, dim=-1)
        text = self.model.text_features(params)
        logits = self.model.logits(features, text)
        entropy = marginal_entropy(logits)
        weights = logits.softmax(-1).mean(1).detach()  # p̄ over the confident views
        align = amplitude_angle_alignment(raw.mean(1), self._visual, weights)
        if cfg.text_alignment:
            align = align + amplitude_angle_alignment(text, self._text, weights)
        return cfg.entropy_weight * entropy + cfg.alignment_weight * align, {"entropy": entropy, "align": align}

    def loss(self, params: PromptParams, ctx: AdaptContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The combined objective at one point (for inspection; :meth:`run_steps` does the meta update)."""
        discrimination = self.meta_train_loss(params)
        meta_test, parts = self.meta_test_loss(params, ctx)
        return discrimination + meta_test, {"discrimination": discrimination, **parts}

    def run_steps(self, params: PromptParams, ctx: AdaptContext) -> dict[str, float]:
        cfg = self.config
        optimizer = self.make_optimizer(params)
        point = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        total: PromptParams = {k: torch.zeros_like(v) for k, v in params.items()}
        terms: dict[str, float] = {}
        for step in range(cfg.steps):
            discrimination = self.meta_train_loss(point)
            g_train = _grads(discrimination, point)
            with torch.no_grad():
                inner = {
                    k: (point[k] - cfg.inner_lr * g / (g.abs() + cfg.eps)).requires_grad_(True)
                    for k, g in g_train.items()
                }
            meta_test, parts = self.meta_test_loss(inner, ctx)
            loss = discrimination.detach() + meta_test.detach()
            if not torch.isfinite(loss).all():
                raise TTAError(f"{self.name}: non-finite test-time loss; lower --lr / --set inner_lr")
            g_test = _grads(meta_test, inner)
            g = {k: (g_train[k] + g_test[k]) / 2 for k in params}
            terms = {"loss": float(loss.mean()), "discrimination": float(discrimination.detach().mean())}
            terms |= {k: float(v.detach().mean()) for k, v in parts.items()}
            if cfg.accumulate == "every":
                optimizer.zero_grad(set_to_none=True)
                for k, tensor in params.items():
                    tensor.grad = g[k]
                optimizer.step()
                point = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            else:
                for k in total:
                    total[k] += g[k] / cfg.steps
                point = {k: v.detach().clone().requires_grad_(True) for k, v in inner.items()}
            del step
        if cfg.accumulate == "final" and cfg.steps > 0:
            optimizer.zero_grad(set_to_none=True)
            for k, tensor in params.items():
                tensor.grad = total[k]
            optimizer.step()
        return terms
