"""PromptSRC: Prompting with Self-regulating Constraints (Khattak, Wasim, Naseer, Khan, Yang & Khan, ICCV 2023;
muzairkhattak/PromptSRC ``trainers/promptsrc.py``).

IVLP prompts (4 + 4 tokens, depth 9/9, init "a photo of a") regularised towards the frozen CLIP (paper §3.2):

- Mutual agreement maximisation (Eq. 2-4), with frozen references computed without prompts:
  - L_text  = λ_t · mean_{c,e} |n(t_p) - n(t̃)|  over C × E,   λ_t = ``text_loss_weight`` = 25
  - L_image = λ_i · mean_{b,e} |n(f_p) - n(f̃)|  over B × E,   λ_i = ``image_loss_weight`` = 10
  - L_KL    = (1 / (B·C)) · Σ_{b,c} p_zs (log p_zs - log p_p) = KL(p_zs ‖ p_p) / (B·C),   T = 1,
    zs logits = s · n(f̃) · n(t̃)ᵀ (no grad)
  - L = L_CE + L_KL + L_text + L_image
- Textual diversity (§3.2.2): t̃_c = mean over templates of the frozen text features of every template filled with
  class c, averaged **unnormalised** and normalised when used. Templates (``diversity_templates``): by default
  (``auto``) the reference's own 60 (``PROMPTSRC_IMAGENET_TEMPLATES``, "a photo of a {}." first), except that a class
  list made only of embedded-world classes takes its world dataset's templates (the world CLIPs' vocabulary holds
  none of the ImageNet prompts' words); ``promptsrc60`` forces the 60 everywhere, ``openai80`` uses the 80 OpenAI
  templates instead (``openai``: the same, the name configs stored before the choice existed use).
  t̃ is computed once per class list, at the first training step (or in ``prepare``), never at inference.
- f̃ comes from the backbone's own image tower run without prompts (the same frozen weights; the reference keeps a
  second copy of the tower, ``ZS_image_encoder``; here nothing is duplicated or saved).
- Gaussian prompt aggregation (GPA, Eq. 6): w_e ∝ N(e; μ, σ²), e = 1..E, normalised to Σ w_e = 1; after the last
  step of epoch e, θ̄ += w_e · θ_e over the learner's trainable tensors only; after the last epoch θ̄ is loaded.
  The accumulator travels in ``resume_state`` so a resumed run aggregates exactly as an uninterrupted one.

Inference uses the prompted logits only. Trainable parameters as IVLP: n_t·W_t·J_t + n_v·W_v·J_v.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from promptkd.backbones import Backbone
from promptkd.checkpoints import CheckpointError
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.base import Batch, StepOutput
from promptkd.methods.ivlp import IVLP, IVLPConfig
from promptkd.methods.prompted import AttributePromptConfig, apply_attributes, cosine_logits

__all__ = [
    "PromptSRC",
    "PromptSRCConfig",
    "diversity_prompts",
    "gpa_weights",
    "promptsrc_losses",
]

logger = logging.getLogger(__name__)

#: Choices of t̃'s templates; ``openai`` is the earlier name of ``openai80`` (configs stored with it still load).
DiversityTemplates = Literal["auto", "promptsrc60", "openai80", "openai"]

_GPA_PREFIX = "gpa.sum."
_GPA_META = "gpa.meta"  # float64 [last epoch accumulated, total epochs, accumulated weight mass]


@dataclass
class PromptSRCConfig(IVLPConfig, AttributePromptConfig):
    """PromptSRC hyper-parameters (``TRAINER.PROMPTSRC.*`` of ``vit_b16_c2_ep20_batch4_4+4ctx``)."""

    n_ctx_text: int = field(default=4, metadata={"help": "text prompt tokens n_t (N_CTX_TEXT)"})
    n_ctx_vision: int = field(default=4, metadata={"help": "visual prompt tokens n_v (N_CTX_VISION)"})
    text_loss_weight: float = field(default=25.0, metadata={"help": "λ_t of L_text (TEXT_LOSS_WEIGHT)"})
    image_loss_weight: float = field(default=10.0, metadata={"help": "λ_i of L_image (IMAGE_LOSS_WEIGHT)"})
    gpa: bool = field(default=True, metadata={"help": "Gaussian prompt aggregation over epochs"})
    gpa_mean: float = field(default=15.0, metadata={"help": "GPA mean μ in epochs (GPA_MEAN)"})
    gpa_std: float = field(default=1.0, metadata={"help": "GPA standard deviation σ in epochs (GPA_STD)"})
    diversity_templates: DiversityTemplates = field(
        default="auto",
        metadata={
            "help": "templates of t̃: 'promptsrc60' (the reference's 60), 'openai80' (OpenAI's 80; 'openai' is the "
            "same), 'auto' = 'promptsrc60' except the world's own templates for world classes"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gpa_std <= 0:
            raise ValueError("gpa_std must be positive")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError("loss weights must be >= 0")
        self.check_attributes()


def gpa_weights(total_epochs: int, mean: float, std: float) -> torch.Tensor:
    """GPA weights w_e ∝ N(e; μ, σ²) for e = 1..E, normalised to sum 1 (float64, [E]).

    Computed in log space (a softmax of -(e-μ)²/2σ²): the Gaussian's constant cancels in the normalisation, and a μ far
    outside 1..E (e.g. the published μ = 15 with a 5-epoch run) still gives finite weights instead of 0/0.
    """
    if total_epochs < 1:
        raise ValueError("GPA needs at least one epoch")
    if std <= 0:
        raise ValueError("GPA standard deviation must be positive")
    epochs = torch.arange(1, total_epochs + 1, dtype=torch.float64)
    return torch.softmax(-0.5 * ((epochs - mean) / std) ** 2, dim=0)


def promptsrc_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    fixed_text_features: torch.Tensor,
    image_features: torch.Tensor,
    frozen_image_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    text_weight: float,
    image_weight: float,
) -> dict[str, torch.Tensor]:
    """The four PromptSRC terms (Eq. 2-5). Feature arguments are L2-normalised; ``fixed_text_features`` is t̃ before
    normalisation (it is normalised here). Returns ``ce``, ``kl``, ``text``, ``image`` and their sum ``loss``."""
    fixed_text = F.normalize(fixed_text_features.float(), dim=-1)
    with torch.no_grad():
        zs_logits = cosine_logits(logit_scale, frozen_image_features, fixed_text)
    ce = F.cross_entropy(logits, labels)
    kl = (
        F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(zs_logits, dim=-1), reduction="sum", log_target=True)
        / logits.numel()
    )
    text = text_weight * F.l1_loss(text_features, fixed_text, reduction="mean")
    image = image_weight * F.l1_loss(image_features, frozen_image_features.float(), reduction="mean")
    return {"ce": ce, "kl": kl, "text": text, "image": image, "loss": ce + kl + text + image}


def _world_templates(classnames: Sequence[str]) -> list[tuple[str, ...]] | None:
    """Per class, its world dataset's templates when every name is an embedded-world class; else None."""
    from promptkd.data.world import WORLD_DATASETS, family_of

    per_family: dict[str, tuple[str, ...]] = {}
    for dataset in sorted(WORLD_DATASETS.values(), key=lambda d: d.test_only):  # training sets first
        per_family.setdefault(dataset.family, dataset.templates)
    out = []
    for name in classnames:
        try:
            out.append(per_family[family_of(name)])
        except KeyError:
            return None
    return out


def diversity_prompts(classnames: Sequence[str], templates: DiversityTemplates = "auto") -> list[list[str]]:
    """The prompts whose frozen features are averaged into t̃_c, per class (PromptSRC textual diversity)."""
    from promptkd.data.templates import OPENAI_IMAGENET_TEMPLATES, PROMPTSRC_IMAGENET_TEMPLATES

    if templates not in ("auto", "promptsrc60", "openai80", "openai"):
        raise ValueError(f"diversity_templates: {templates!r} is not one of 'auto', 'promptsrc60', 'openai80'")
    per_class = _world_templates(classnames) if templates == "auto" else None
    if per_class is None:
        chosen = OPENAI_IMAGENET_TEMPLATES if templates in ("openai80", "openai") else PROMPTSRC_IMAGENET_TEMPLATES
        per_class = [tuple(chosen)] * len(classnames)
    return [[t.replace("{}", name.replace("_", " ")) for t in group] for name, group in zip(classnames, per_class)]


@register_method
class PromptSRC(IVLP):
    """PromptSRC: IVLP + self-regulating losses towards the frozen CLIP + GPA (see the module docstring).

    Needs the engine to call ``on_epoch_end(epoch, total_epochs)`` after every epoch and ``on_train_end()`` before
    the final checkpoint, and to carry ``resume_state()`` in resumable checkpoints.
    """

    name: ClassVar[str] = "promptsrc"
    config_class: ClassVar[type[MethodConfig]] = PromptSRCConfig
    config: PromptSRCConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: PromptSRCConfig | None = None):
        super().__init__(backbone, classnames, config)
        apply_attributes(self, self.config)  # ATPrompt: t̃ stays the plain templates' features (no attributes)
        # t̃ (unnormalised mean over templates) for the current classes; filled lazily, never saved.
        self.register_buffer("fixed_text_features", None, persistent=False)
        self._gpa_sum: dict[str, torch.Tensor] = {}
        self._gpa_epoch = 0
        self._gpa_total = 0
        self._gpa_mass = 0.0

    # --- frozen references ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_fixed_text_features(self, batch_size: int = 1024) -> torch.Tensor:
        """t̃ for the current classes: frozen text features of every diversity prompt, averaged unnormalised [C, E].

        Runs the backbone's plain text tower in float32 (autocast off), once per class list.
        """
        prompts = diversity_prompts(self.classnames, self.config.diversity_templates)
        device = self.learner.text.token_ids.device
        flat = [p for group in prompts for p in group]
        owner = torch.tensor([c for c, group in enumerate(prompts) for _ in group], device=device)
        parts = []
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, len(flat), batch_size):
                ids = self.backbone.tokenize(flat[start : start + batch_size]).to(device)
                parts.append(self.text_encoder.encode_ids(ids).float())
        features = torch.cat(parts)
        summed = torch.zeros(len(prompts), features.shape[1], device=device).index_add_(0, owner, features)
        counts = torch.bincount(owner, minlength=len(prompts)).to(summed.dtype)
        self.fixed_text_features = summed / counts[:, None]
        return self.fixed_text_features

    def prepare(self, train_batches: Any, val_batches: Any) -> None:
        if self.fixed_text_features is None:
            self.compute_fixed_text_features()

    def set_classnames(self, classnames: list[str]) -> None:
        super().set_classnames(classnames)
        self.fixed_text_features = None  # recomputed if this class list is trained on

    # --- training ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch) -> StepOutput:
        labels = self._labels(batch)
        fixed_text = self.fixed_text_features
        if fixed_text is None:
            fixed_text = self.compute_fixed_text_features()
        logits, image, text = self.prompted_logits(batch.images)
        terms = promptsrc_losses(
            logits,
            labels,
            text,
            fixed_text,
            image,
            self.frozen_image_features(batch.images),
            self.logit_scale(),
            self.config.text_loss_weight,
            self.config.image_loss_weight,
        )
        return StepOutput(terms["loss"], {k: float(v.detach()) for k, v in terms.items() if k != "loss"})

    # --- Gaussian prompt aggregation --------------------------------------------------------------------------------
    def gpa_weights(self, total_epochs: int) -> torch.Tensor:
        return gpa_weights(total_epochs, self.config.gpa_mean, self.config.gpa_std)

    def on_epoch_end(self, epoch: int, total_epochs: int) -> None:
        """θ̄ += w_epoch · θ_epoch over the learner's trainable tensors (GPA)."""
        if not self.config.gpa:
            return
        if self._gpa_total and total_epochs != self._gpa_total:
            raise ValueError(f"promptsrc GPA: total_epochs changed from {self._gpa_total} to {total_epochs}")
        if not 1 <= epoch <= total_epochs or epoch <= self._gpa_epoch:
            raise ValueError(
                f"promptsrc GPA: epoch {epoch} of {total_epochs} after epoch {self._gpa_epoch} was accumulated"
            )
        if epoch != self._gpa_epoch + 1:
            logger.warning("promptsrc GPA: epochs %d..%d were not accumulated", self._gpa_epoch + 1, epoch - 1)
        weight = float(self.gpa_weights(total_epochs)[epoch - 1])
        with torch.no_grad():
            for key, value in self.trainable_state().items():
                if key not in self._gpa_sum:
                    self._gpa_sum[key] = torch.zeros_like(value)
                self._gpa_sum[key].add_(value.detach(), alpha=weight)
        self._gpa_epoch, self._gpa_total = epoch, total_epochs
        self._gpa_mass += weight

    def gpa_average(self) -> dict[str, torch.Tensor]:
        """The aggregated prompts θ̄ accumulated so far (a copy)."""
        return {k: v.clone() for k, v in self._gpa_sum.items()}

    def on_train_end(self) -> None:
        """Load θ̄ into the learner (after the last epoch's ``on_epoch_end``)."""
        if not self.config.gpa or not self._gpa_sum:
            return
        average = self.gpa_average()
        if self._gpa_epoch != self._gpa_total:
            if self._gpa_mass <= 1e-12:
                logger.warning("promptsrc GPA: training stopped before any weighted epoch; keeping the last prompts")
                return
            logger.warning(
                "promptsrc GPA: training stopped at epoch %d of %d; using the weighted average of the epochs so far",
                self._gpa_epoch,
                self._gpa_total,
            )
            average = {k: v / self._gpa_mass for k, v in average.items()}
        self.load_trainable(average, "GPA average")
        self._gpa_sum, self._gpa_epoch, self._gpa_total, self._gpa_mass = {}, 0, 0, 0.0

    def resume_state(self) -> dict[str, torch.Tensor]:
        if not self._gpa_sum:
            return {}
        state = {_GPA_PREFIX + k: v.detach().clone() for k, v in self._gpa_sum.items()}
        state[_GPA_META] = torch.tensor([self._gpa_epoch, self._gpa_total, self._gpa_mass], dtype=torch.float64)
        return state

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        self._gpa_sum, self._gpa_epoch, self._gpa_total, self._gpa_mass = {}, 0, 0, 0.0
        if not state:
            return
        unknown = sorted(k for k in state if k != _GPA_META and not k.startswith(_GPA_PREFIX))
        if unknown or _GPA_META not in state:
            raise CheckpointError(f"promptsrc: resume state is not a GPA accumulator (keys {sorted(state)[:6]})")
        own = self.trainable_state()
        sums = {k[len(_GPA_PREFIX) :]: v for k, v in state.items() if k.startswith(_GPA_PREFIX)}
        if set(sums) != set(own) or any(tuple(sums[k].shape) != tuple(own[k].shape) for k in own):
            raise CheckpointError(
                f"promptsrc: the GPA accumulator holds {sorted(sums)} but the prompts are {sorted(own)} "
                "(with these shapes); it belongs to another configuration."
            )
        self._gpa_sum = {k: sums[k].to(device=own[k].device, dtype=own[k].dtype).clone() for k in own}
        epoch, total, mass = state[_GPA_META].tolist()
        self._gpa_epoch, self._gpa_total, self._gpa_mass = int(epoch), int(total), float(mass)
