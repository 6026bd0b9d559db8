"""Zero-shot CLIP as a method, and the fixed hand-crafted text classifier that several baselines share.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021), Sec. 3.1.4;
CoOp's ``ZeroshotCLIP`` / ``ZeroshotCLIP2`` trainers (KaiyangZhou/CoOp, trainers/zsclip.py):

    W = n(mean_t n(g(template_t(class_c))))          (one column per class, [E, C])
    logits = exp(logit_scale) * n(f(x)) @ W            (s = 100 for OpenAI weights)

``FixedTextMethod`` computes W once per class list with
:func:`promptkd.evaluation.zeroshot.zeroshot_classifier` (cached) and is the base of the methods that keep the text
side fixed: VPT-deep, visual prompting (VP), CLIP-Adapter and Tip-Adapter. Nothing on the text side runs per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from promptkd.backbones import Backbone
from promptkd.config import ConfigError
from promptkd.data.templates import DEFAULT_TEMPLATE
from promptkd.errors import PromptKDError
from promptkd.evaluation.zeroshot import TEMPLATE_MODES, resolve_templates, zeroshot_classifier
from promptkd.methods import register_method
from promptkd.methods.base import Batch, Method, MethodConfig, StepOutput
from promptkd.prompts import clean_classname

__all__ = [
    "FixedTextMethod",
    "ZeroShotCLIP",
    "ZeroShotConfig",
    "check_templates",
    "full_precision",
    "require_labels",
    "resolve_template_list",
]

#: Named template sets a config may give as its only entry (see ``resolve_templates``); "dataset" needs the
#: dataset's name, which a method does not know, so it is not offered here.
NAMED_TEMPLATE_SETS = tuple(m for m in TEMPLATE_MODES if m != "dataset")


def check_templates(templates: Sequence[str], where: str = "templates") -> None:
    """Fail early on an empty list or a template without a class-name placeholder."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: give at least one template, e.g. {DEFAULT_TEMPLATE!r}")
    if len(templates) == 1 and templates[0] in NAMED_TEMPLATE_SETS:
        return
    for template in templates:
        if "{}" not in template and "{c}" not in template:
            raise ValueError(
                f"{where}: template {template!r} has no '{{}}' placeholder for the class name "
                f"(or name one template set alone: {', '.join(NAMED_TEMPLATE_SETS)})"
            )


def resolve_template_list(templates: Sequence[str]) -> list[str]:
    """A config's template list; a single named set ("single", "ensemble", "openai") is expanded."""
    templates = list(templates)
    if len(templates) == 1 and templates[0] in NAMED_TEMPLATE_SETS:
        return [str(t) for t in resolve_templates(templates[0])]
    return templates


def full_precision(device: torch.device) -> torch.autocast:
    """A region where autocast is off (classifier heads computed in float32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def require_labels(batch: Batch, method: str) -> torch.Tensor:
    if batch.labels is None:
        raise PromptKDError(f"{method} trains with cross-entropy and needs labelled batches; this batch has none.")
    return batch.labels


class FixedTextMethod(Method):
    """A method whose classifier is CLIP's hand-crafted text features W [E, C], computed once per class list.

    W is a non-persistent buffer (``text_features``, stored as [C, E]): it moves with ``.to(device)`` but is never
    saved, since it is rebuilt from the class names and the config's ``templates``.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], config: MethodConfig | None = None):
        super().__init__(backbone, classnames, config)
        self._build_text_features(self.classnames)

    def fixed_templates(self) -> list[str]:
        return resolve_template_list(getattr(self.config, "templates", [DEFAULT_TEMPLATE]))

    def _build_text_features(self, classnames: Sequence[str]) -> None:
        if not classnames:
            raise PromptKDError(f"{self.name}: the class list is empty")
        names = [clean_classname(c) for c in classnames]
        weights = zeroshot_classifier(self.backbone, names, self.fixed_templates())  # [E, C], unit columns
        self.register_buffer("text_features", weights.T.contiguous().to(self.backbone.device), persistent=False)

    def set_classnames(self, classnames: list[str]) -> None:
        """Rebuild W for another class list (the learned parts of these methods are class-agnostic)."""
        super().set_classnames(classnames)
        self._build_text_features(self.classnames)

    @property
    def logit_scale(self) -> torch.Tensor:
        """s = exp(logit_scale), frozen (100 for OpenAI weights)."""
        return self.backbone.logit_scale

    def classify(self, image_features: torch.Tensor) -> torch.Tensor:
        """s * n(f) @ W: CLIP's cosine classifier over the fixed text features, [B, C], in float32 even under
        autocast (bf16 cosines are good to ~3 digits, i.e. +-0.3 on a logit scaled by 100)."""
        with full_precision(image_features.device):
            features = F.normalize(image_features.float(), dim=-1)
            text = self.text_features.to(features.device)
            return self.logit_scale.to(features.device) * features @ text.T


@dataclass
class ZeroShotConfig(MethodConfig):
    """Zero-shot CLIP (Radford et al. 2021): one template, or an ensemble averaged as in CoOp's ``ZeroshotCLIP2``.

    ``templates`` use ``"{}"`` for the class name; a single entry "single", "ensemble" (CoOp's 7 ImageNet templates
    + "a photo of a {}.") or "openai" (the 80 OpenAI ImageNet templates) names a built-in set.
    """

    templates: list[str] = field(default_factory=lambda: [DEFAULT_TEMPLATE])

    def __post_init__(self) -> None:
        check_templates(self.templates)


@register_method
class ZeroShotCLIP(FixedTextMethod):
    """logits = exp(logit_scale) * n(f(x)) @ W; nothing is trained or saved."""

    name = "zeroshot"
    config_class = ZeroShotConfig
    trains = False
    uses_labels = False

    def training_step(self, batch: Batch) -> StepOutput:
        raise ConfigError("zero-shot CLIP has nothing to train (trains = False); evaluate it directly.")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.clip.encode_image(images))
