"""PromptSync (Khandelwal, CVPR 2024 Workshops, arXiv 2404.07520): class-aware prototype alignment and
discrimination on MaPLe's multimodal prompts. No public code exists; this is our reading of the paper, with every
open choice a flag:

- Prototypes (``promptkd tta-stats --prototypes``), offline on a labelled proxy source set with the test classes:
  per class, the mean unnormalised image embedding of its samples and their augmented views (visual prototype),
  ``views_per_class`` normalised augmented-view features, and the base prompts' class text feature (text
  prototype).
- Discrimination L_D (meta-train), per sample: the class text features under the sample's current prompts are the
  class prototypes; positives are the class's stored augmented views, negatives the three terms of the paper
  (prototype vs other prototypes, own views vs other prototypes, prototype vs other classes' views), with
  s(a, b) = exp(cos(a, b) / τ) and L_D = mean_k −log(pos_k / (pos_k + neg_k)), the contrastive form whose value
  is bounded below by 0 (``discrimination='ratio'``: −log(pos_k / neg_k), unbounded, promptkd's form before).
  *Choice*: the positives of a class are summed in one numerator (one term per class, not one per view).
- Alignment L_A (meta-test), per sample: the test prototype is the mean unnormalised embedding of the confident
  views; for every class, an amplitude term log(1 + |‖x‖ − ‖p_c‖| / ‖p_c‖) and an angular term −log((1 + cos) / 2),
  weighted by the mean class probabilities p̄ of the confident views (detached). *Choice*: on the visual branch
  against the visual prototypes and, with ``text_alignment``, on the text branch (each class text feature against
  its text prototype; unit norms, so only the angle counts).
- Confident views: the paper filters the views again with the updated prompts. With ``view_selection='updated'``
  (default) every iteration re-scores all views with the prompts θ' of the meta-test step (one extra no-gradient
  pass over the views per iteration) and keeps the lowest-entropy ``selection`` fraction; *choice*: θ' (the prompts
  the meta-test loss is evaluated at) rather than θ; the result reports the last selection. ``'initial'``: once,
  with the base prompts (as TPT).
- Update: meta-train gradient g_D at θ; inner step θ' = θ − α · g_D / (|g_D| + ε) (one fresh-AdamW step, scale-free);
  meta-test gradient g_T of H(p̄) + λ_A · L_A at θ' (first order); g = (g_D + g_T) / 2. ``accumulate='final'``
  (the paper): the n iterations walk θ ← θ' and their gradients are averaged into one final AdamW step from the
  initial prompts; ``'every'``: an AdamW step after every iteration.

Departures from the paper that remain, and why:

- Views: 128 per image (the original and 127 augmented, the paper's count) but made by promptkd's TPT views
  (random resized crops and flips, AugMix on fine-grained sets; ``promptkd.tta.views``, shared with TPT, whose
  views follow TPT's code), not the paper's background replacement and corruptions: background replacement needs a
  segmentation model promptkd does not ship, and corruption views would make a PromptSync-only view family.
- No WordNet text augmentation of the class prompts: WordNet is not available offline, and promptkd's class lists
  (the embedded world's shapes) have no synsets.
- Prototypes are final embeddings (after the towers' projections), not the encoders' output tokens: L_D contrasts
  class text features with image view features, which share a space only after the projections; the alignment
  uses the same file so both losses see one set of prototypes.
- τ, α, the loss weights and the learning rate are our choices (the paper gives no values we could confirm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from promptkd.config import NON_NEGATIVE, POSITIVE
from promptkd.tta.base import AdaptContext, TTAConfig, TTAError, TTAMethod, register_tta_method
from promptkd.tta.losses import (
    amplitude_angle_alignment,
    confident_views,
    marginal_entropy,
    prototype_discrimination,
)
from promptkd.tta.model import PromptParams
from promptkd.tta.sources import Prototypes


@dataclass
class PromptSyncConfig(TTAConfig):
    n_views: int = field(default=128, metadata={"help": "views per test image, the original included (paper: 1+127)"})
    lr: float = 4e-2
    inner_lr: float = field(default=4e-2, metadata={"help": "α of the meta-train inner step", "rule": NON_NEGATIVE})
    discrimination_temperature: float = field(default=0.07, metadata={"help": "τ of L_D", "rule": POSITIVE})
    discrimination_weight: float = field(default=1.0, metadata={"rule": NON_NEGATIVE})
    discrimination: Literal["infonce", "ratio"] = field(
        default="infonce", metadata={"help": "L_D = −log(pos/(pos+neg)) (infonce, ≥ 0) or −log(pos/neg) (ratio)"}
    )
    alignment_weight: float = field(
        default=1.0, metadata={"help": "λ_A of L_A in the meta-test objective", "rule": NON_NEGATIVE}
    )
    entropy_weight: float = field(default=1.0, metadata={"rule": NON_NEGATIVE})
    text_alignment: bool = field(default=True, metadata={"help": "also align class text features to text prototypes"})
    accumulate: Literal["final", "every"] = "final"
    view_selection: Literal["updated", "initial"] = field(
        default="updated", metadata={"help": "confident views chosen with the updated prompts each step, or once"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.discrimination_temperature <= 0:
            raise ValueError("discrimination_temperature must be positive")


def _grads(loss: torch.Tensor, params: PromptParams) -> PromptParams:
    keys = list(params)
    grads = torch.autograd.grad(loss.sum(), [params[k] for k in keys], allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(keys, grads)}


def _leaves(params: PromptParams) -> PromptParams:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


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
        cfg = self.config
        text = self.model.text_features(params)
        return cfg.discrimination_weight * prototype_discrimination(
            text, self._views, cfg.discrimination_temperature, bounded=cfg.discrimination == "infonce"
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

    # --- view selection with the current prompts ------------------------------------------------------------------
    @torch.no_grad()
    def view_logits(self, params: PromptParams, ctx: AdaptContext) -> torch.Tensor:
        """[B, V, C] logits of every view under each sample's ``params`` (views re-encoded when the prompts reach
        the image tower, ``image_chunk`` views at a time)."""
        model = self.model
        text = model.text_features(params, grad=False)
        if not ctx.dynamic_visual:
            return model.logits(ctx.view_features, text)
        per_chunk = max(1, model.image_chunk // ctx.n_views)
        features = []
        for start in range(0, ctx.batch, per_chunk):
            rows = slice(start, start + per_chunk)
            views = ctx.views[rows]
            chunk = {k: v[rows] for k, v in params.items()}
            encoded = model.encode_images(views.flatten(0, 1), chunk, views_per_sample=ctx.n_views)
            features.append(encoded.view(views.shape[0], ctx.n_views, -1))
        return model.logits(torch.cat(features), text)

    def select_views(self, params: PromptParams, ctx: AdaptContext) -> None:
        """Re-choose each sample's confident views with its prompts ``params`` (the paper filters again with the
        updated prompts); ``ctx`` then serves the new selection (its size k is unchanged)."""
        selected = confident_views(self.view_logits(params, ctx), self.config.selection)
        ctx.selected = selected
        if ctx.dynamic_visual:
            rows = torch.arange(ctx.batch, device=selected.device).unsqueeze(1)
            ctx.selected_views = ctx.views[rows, selected]

    # --- the meta update ------------------------------------------------------------------------------------------
    def meta_step(self, point: PromptParams, ctx: AdaptContext) -> tuple[PromptParams, PromptParams, dict[str, float]]:
        """One iteration at θ = ``point``: (g = (g_D + g_T) / 2, θ', mean loss terms)."""
        cfg = self.config
        discrimination = self.meta_train_loss(point)
        g_train = _grads(discrimination, point)
        with torch.no_grad():
            inner = {k: (point[k] - cfg.inner_lr * g / (g.abs() + cfg.eps)) for k, g in g_train.items()}
        inner = {k: v.requires_grad_(True) for k, v in inner.items()}
        if cfg.view_selection == "updated":
            self.select_views(inner, ctx)
        meta_test, parts = self.meta_test_loss(inner, ctx)
        loss = discrimination.detach() + meta_test.detach()
        if not torch.isfinite(loss).all():
            raise TTAError(f"{self.name}: non-finite test-time loss; lower --lr / --set inner_lr")
        g_test = _grads(meta_test, inner)
        g = {k: (g_train[k] + g_test[k]) / 2 for k in point}
        terms = {"loss": float(loss.mean()), "discrimination": float(discrimination.detach().mean())}
        return g, inner, terms | {k: float(v.detach().mean()) for k, v in parts.items()}

    def run_steps(self, params: PromptParams, ctx: AdaptContext) -> dict[str, float]:
        cfg = self.config
        optimizer = self.make_optimizer(params)
        point = _leaves(params)
        total: PromptParams = {k: torch.zeros_like(v) for k, v in params.items()}
        terms: dict[str, float] = {}
        for _ in range(cfg.steps):
            g, inner, terms = self.meta_step(point, ctx)
            if cfg.accumulate == "every":
                optimizer.zero_grad(set_to_none=True)
                for k, tensor in params.items():
                    tensor.grad = g[k]
                optimizer.step()
                point = _leaves(params)
            else:
                for k in total:
                    total[k] += g[k] / cfg.steps
                point = _leaves(inner)
        if cfg.accumulate == "final" and cfg.steps > 0:
            optimizer.zero_grad(set_to_none=True)
            for k, tensor in params.items():
                tensor.grad = total[k]
            optimizer.step()
        return terms
