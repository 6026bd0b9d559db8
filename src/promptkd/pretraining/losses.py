"""Contrastive pre-training objectives for CLIP: image-text InfoNCE and its image-text-label (UniCL) variant.

Both take L2-normalised image features ``u`` (B x D), text features ``v`` (B x D) and the learnable log inverse
temperature ``logit_scale`` (open_clip's parameter, initialised at ln(1/0.07)); the scale used is
``s = exp(logit_scale)``, as open_clip's ``ClipLoss`` receives it. The cap at 100 is CLIP's and open_clip's: the
*parameter* is clamped to [0, ln 100] around each optimiser step (:func:`clamp_logit_scale_`), never inside the
loss, so at the cap the parameter still gets its true gradient (a clamp in the loss would pass it exactly 0).

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP, 2021),
and Yang et al., "Unified Contrastive Learning in Image-Text-Label Space" (UniCL, 2022); the equations follow
Zhang et al.'s survey "Vision-Language Models for Vision Tasks" (Eqs. for L_infoNCE^IT and L_infoNCE^ITL), with
the two directions averaged as CLIP does rather than summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MAX_LOGIT_SCALE",
    "OBJECTIVES",
    "clamp_logit_scale_",
    "clip_loss",
    "contrastive_logits",
    "itl_loss",
    "objective_loss",
    "same_label_targets",
]

#: CLIP clamps the inverse temperature at 100 so that training cannot sharpen the softmax without bound.
MAX_LOGIT_SCALE = math.log(100.0)

#: Names accepted by :func:`objective_loss` (and the CLI's ``--objective``).
OBJECTIVES: tuple[str, ...] = ("clip", "itl")


def contrastive_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float, normalize: bool = True
) -> torch.Tensor:
    """Image-to-text logits ``s * u_i . v_j`` (B x B), with ``s = exp(logit_scale)`` (the caller keeps the parameter
    at or below ln 100 with :func:`clamp_logit_scale_`, as open_clip's trainer does).

    Computed in fp32 even under bf16 autocast: the softmax over a batch is where low precision hurts.
    """
    u, v = image_features.float(), text_features.float()
    if normalize:
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=u.device).exp()
    return scale * u @ v.t()


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float, normalize: bool = True
) -> torch.Tensor:
    """Symmetric image-text InfoNCE (the CLIP loss): pair ``i`` is the only positive of row and column ``i``.

    ``L = 1/2 (L_I->T + L_T->I)`` with
    ``L_I->T = -1/B sum_i log( exp(s u_i.v_i) / sum_j exp(s u_i.v_j) )`` and
    ``L_T->I = -1/B sum_i log( exp(s v_i.u_i) / sum_j exp(s v_i.u_j) )``.
    """
    logits = contrastive_logits(image_features, text_features, logit_scale, normalize)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def same_label_targets(labels: torch.Tensor) -> torch.Tensor:
    """Row-normalised same-label mask ``T_ij = 1[y_i = y_j] / |{k : y_k = y_i}|`` (B x B, rows sum to 1).

    A negative label (-1: an unlabelled caption) matches nothing but itself: UniCL gives every image-text pair
    without a class label its own class, so such a pair has its own text as its only positive, as in CLIP.
    """
    labels = labels.reshape(-1).long()
    unlabelled = labels < 0
    if bool(unlabelled.any()):
        own = labels.max().clamp(min=-1) + 1 + torch.arange(labels.numel(), device=labels.device)
        labels = torch.where(unlabelled, own, labels)
    mask = (labels[:, None] == labels[None, :]).float()
    return mask / mask.sum(dim=1, keepdim=True)


def itl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    normalize: bool = True,
) -> torch.Tensor:
    """Image-text-label contrastive loss (UniCL): every pair whose labels agree is a positive.

    ``L = 1/2 (L_I->T + L_T->I)`` with
    ``L_I->T = -1/B sum_i 1/|P(i)| sum_{k in P(i)} log( exp(s u_i.v_k) / sum_j exp(s u_i.v_j) )``,
    ``P(i) = {k : y_k = y_i}``, and ``L_T->I`` the same with ``u`` and ``v`` exchanged: a cross-entropy against
    :func:`same_label_targets` in both directions (the mask is symmetric, so both use the same targets). Captions of
    the same class in a batch are no longer pushed apart as false negatives. An unlabelled pair (label -1) is its own
    class, as in UniCL. With all labels distinct (or all -1) it equals :func:`clip_loss`.
    """
    logits = contrastive_logits(image_features, text_features, logit_scale, normalize)
    targets = same_label_targets(labels.to(logits.device))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def objective_loss(
    objective: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss named ``objective`` (``"clip"`` or ``"itl"``); ``itl`` needs ``labels``."""
    if objective == "clip":
        return clip_loss(image_features, text_features, logit_scale)
    if objective == "itl":
        if labels is None:
            raise ValueError("objective 'itl' needs class labels; use objective 'clip' for unlabelled captions")
        return itl_loss(image_features, text_features, labels, logit_scale)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module) -> None:
    """Clamp the model's ``logit_scale`` parameter to [0, ln 100] in place around each optimiser step (as CLIP and
    open_clip): the only place the cap applies, so the loss's gradient at the cap is the true one."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0.0, MAX_LOGIT_SCALE)
