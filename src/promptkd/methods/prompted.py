"""The prompted-CLIP forward shared by the prompt-learning family (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC).

Every method of the family classifies with CLIP's rule (Radford et al., 2021; CoOp Eq. 2):

    p(y = c | x) = softmax_c( s · cos(f(x; P_v), g(t_c; P_t)) ),  s = exp(logit_scale) (frozen)

where ``f`` is the image tower run with visual prompts ``P_v`` (none for CoOp), ``g`` the text tower run on the
class prompt ``t_c`` built from learnable context plus deep text prompts ``P_t`` (none for CoOp). The methods differ
only in where the prompts come from; :class:`PromptedMethod` holds the rest: the two prompted towers, the features,
the logits, the cross-entropy step, class-list switching and a cache of the class text features for inference.

A subclass builds ``self.learner.text`` (a :class:`~promptkd.prompts.TextPromptLearner`) and overrides
:meth:`PromptedMethod.text_deep_prompts` / :meth:`PromptedMethod.visual_prompts` when it has deep prompts.

ATPrompt (Li et al., ICCV 2025; zhengli97/ATPrompt) is a prompt *form*, not a method: every method whose config
mixes in :class:`AttributePromptConfig` (CoOp, CoCoOp, MaPLe, PromptSRC) puts the configured attribute words, each
after its own block of soft tokens, before its class context (:func:`apply_attributes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from promptkd.backbones import Backbone
from promptkd.errors import PromptKDError
from promptkd.methods.base import Batch, Method, MethodConfig, StepOutput
from promptkd.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptLearner
from promptkd.prompts.learners import normalise_attributes

__all__ = [
    "AttributePromptConfig",
    "PromptConfigError",
    "PromptedMethod",
    "apply_attributes",
    "check_depth",
    "cosine_logits",
    "make_text_learner",
]


class PromptConfigError(PromptKDError, ValueError):
    """Prompt settings that do not fit the method or the backbone (depth beyond the tower, bad init phrase...)."""


@dataclass
class AttributePromptConfig:
    """ATPrompt options of every method with a learned text prompt (reference ``TRAINER.ATPROMPT.*``).

    Empty ``attributes`` (the default) is the method's own prompt, bit for bit. ``promptkd attribute-search`` picks
    the attributes for a dataset and prints the ``--set method.attributes=...`` to paste.
    """

    attributes: list[str] = field(
        default_factory=list,
        metadata={"help": "ATPrompt attribute words, e.g. [color, shape] (ATT1_TEXT..); [] = no attributes"},
    )
    attribute_ctx: int = field(
        default=0, metadata={"help": "soft tokens before each attribute (N_ATT1..); 0 = the class context's count"}
    )
    attribute_init_std: float = field(default=0.01, metadata={"help": "std of the attribute soft-token init"})

    def check_attributes(self) -> None:
        """Called from the method config's ``__post_init__``: bad words or counts are refused with the config."""
        self.attributes = list(normalise_attributes(self.attributes))
        if self.attribute_ctx < 0:
            raise ValueError("attribute_ctx must be >= 0 (0 = as many soft tokens as the class context)")
        if self.attribute_init_std <= 0:
            raise ValueError("attribute_init_std must be positive")


def apply_attributes(method: PromptedMethod, config: AttributePromptConfig) -> None:
    """Give ``method.learner.text`` the config's ATPrompt attributes (nothing to do without any)."""
    if not config.attributes:
        return
    try:
        method.learner.text.set_attributes(
            config.attributes, config.attribute_ctx or None, init_std=config.attribute_init_std
        )
    except ValueError as error:
        raise PromptConfigError(f"{method.name}: {error}") from error


def check_depth(method: str, field: str, depth: int, blocks: int, tower: str, backbone: Backbone) -> None:
    """Refuse a prompt depth deeper than the tower (never clip it silently: the config would not mean what it says)."""
    if depth > blocks:
        raise PromptConfigError(
            f"{method}: {field}={depth} but the {tower} tower of {backbone.spec.model_name} has only {blocks} blocks; "
            f"set method.{field} to at most {blocks} (the published depth 9 is for 12-block ViT-B/16 towers; "
            "the world presets set depths that fit the world models)."
        )


def make_text_learner(
    method: str,
    encoder: PromptedTextEncoder,
    backbone: Backbone,
    classnames: Sequence[str],
    **kwargs: Any,
) -> TextPromptLearner:
    """A :class:`TextPromptLearner`; its ValueErrors become a :class:`PromptConfigError` naming ``method``."""
    try:
        return TextPromptLearner(encoder, backbone.tokenizer, classnames, **kwargs)
    except ValueError as error:
        raise PromptConfigError(f"{method}: {error}") from error


def cosine_logits(scale: torch.Tensor | float, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``scale · image @ textᵀ`` for normalised features, in float32 even under autocast (bf16 cosines are only good
    to ~3 digits, i.e. ±0.3 on a logit scaled by 100)."""
    with torch.autocast(device_type=image.device.type, enabled=False):
        return scale * image.float() @ text.float().t()


def _autocast_key(device: torch.device) -> tuple[bool, torch.dtype | None]:
    kind = device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # pragma: no cover - torch < 2.4
        enabled = torch.is_autocast_enabled()
    return enabled, (torch.get_autocast_dtype(kind) if enabled else None)


class PromptedMethod(Method):
    """Frozen CLIP + learnable prompts, trained with cross-entropy on ``s · cos`` logits (the family's base class).

    Helpers for subclasses and for other methods that use a prompted model (e.g. a PromptKD teacher):
    :meth:`text_features` (all classes, normalised), :meth:`image_features` (prompted, normalised),
    :meth:`frozen_image_features` (the backbone's own tower, no prompts), :meth:`logit_scale` and
    :meth:`prompted_logits`. Features and logits are float32 whatever the autocast precision.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], config: MethodConfig | None = None):
        super().__init__(backbone, classnames, config)
        # Views of the frozen CLIP towers (the same modules as ``self.clip``; registered so ``.to()`` moves their
        # attention-mask buffer); nothing in them is trainable or saved.
        self.text_encoder = PromptedTextEncoder(backbone.model)
        self.image_encoder = PromptedImageEncoder(backbone.model)
        self._text_cache: tuple[tuple, torch.Tensor] | None = None

    # --- where the prompts come from (subclasses override) ------------------------------------------------------------
    def text_deep_prompts(self) -> torch.Tensor | Sequence[torch.Tensor] | None:
        """Deep text prompts for blocks 1..J_t-1 ([J_t-1, n, W_t]); None without deep prompts."""
        return self.learner.text.deep

    def visual_prompts(self) -> torch.Tensor | Sequence[torch.Tensor] | None:
        """Visual prompts for blocks 0..J_v-1 ([J_v, n, W_v] or a per-layer list); None for a plain image tower."""
        return None

    # --- features and logits ------------------------------------------------------------------------------------------
    def logit_scale(self) -> torch.Tensor:
        """s = exp(logit_scale), frozen (float32 scalar)."""
        return self.clip.logit_scale.detach().float().exp()

    def text_features(self) -> torch.Tensor:
        """n(g(t_c; P_t)) for every current class: [C, E], float32."""
        embeddings, token_ids = self.learner.text()
        deep = self.text_deep_prompts()
        features = self.text_encoder(embeddings, token_ids, deep, deep_offset=self.learner.text.deep_offset)
        return F.normalize(features.float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """n(f(x; P_v)): [B, E], float32."""
        features = self.image_encoder(images, self.visual_prompts())
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """n(f(x)) of the backbone's own frozen image tower (no prompts): [B, E], float32, no grad."""
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def prompted_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, C], image features [B, E], text features [C, E]) of the prompted model."""
        text = self.text_features()
        image = self.image_features(images)
        return cosine_logits(self.logit_scale(), image, text), image, text

    # --- the Method hooks -------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch) -> StepOutput:
        labels = self._labels(batch)
        logits, _, _ = self.prompted_logits(batch.images)
        loss = F.cross_entropy(logits, labels)
        return StepOutput(loss, {"ce": float(loss.detach())})

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        image = self.image_features(images)
        return cosine_logits(self.logit_scale(), image, self._inference_text_features())

    def set_classnames(self, classnames: list[str]) -> None:
        self.learner.text.set_classnames(classnames)
        super().set_classnames(classnames)
        self.clear_cache()

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: Any) -> None:
        super().load_trainable(tensors, source)
        self.clear_cache()

    def train(self, mode: bool = True) -> PromptedMethod:
        self.clear_cache()
        super().train(mode)
        return self

    # --- helpers ----------------------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget cached inference text features (done automatically on train(), set_classnames and loading)."""
        self._text_cache = None

    def _labels(self, batch: Batch) -> torch.Tensor:
        if batch.labels is None:
            raise PromptKDError(f"{self.name} trains with cross-entropy and needs labelled batches (labels is None).")
        return batch.labels

    def _inference_text_features(self) -> torch.Tensor:
        """Text features for ``logits``: cached under no_grad, since they do not depend on the images.

        The cache key holds every learner tensor's storage and version counter (bumped by optimiser steps and
        in-place edits), the class buffers, the device and the autocast state, so a stale entry is never used.
        """
        if torch.is_grad_enabled():
            return self.text_features()
        device = self.learner.text.token_ids.device
        key = (
            tuple((p.data_ptr(), p._version) for p in self.learner.parameters()),
            self.learner.text.token_ids.data_ptr(),
            device,
            _autocast_key(device),
        )
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, self.text_features())
        return self._text_cache[1]
