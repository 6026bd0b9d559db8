"""Contrastive pre-training of small CLIPs (image-text InfoNCE or image-text-label), e.g. on the embedded world.

The objective is the ``contrastive`` method (:mod:`promptkd.methods.contrastive`) trained by the shared engine;
:func:`~promptkd.pretraining.run.run_pretraining` is what ``promptkd pretrain`` runs. The losses are small functions
in :mod:`promptkd.pretraining.losses` that can be checked against their equations; the world's zero-shot sets are in
:mod:`promptkd.pretraining.world_eval`.
"""

from promptkd.pretraining.losses import (
    MAX_LOGIT_SCALE,
    OBJECTIVES,
    clamp_logit_scale_,
    clip_loss,
    contrastive_logits,
    itl_loss,
    objective_loss,
    same_label_targets,
)

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
