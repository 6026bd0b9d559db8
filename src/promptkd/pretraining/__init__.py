"""Contrastive pre-training of small CLIPs (image-text InfoNCE or image-text-label), e.g. on the embedded world.

``pretrain(backbone, dataset, config)`` trains an open_clip CLIP in memory on a CPU in minutes; the losses are small
functions in :mod:`promptkd.pretraining.losses` that can be checked against their equations.
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
from promptkd.pretraining.train import (
    CURVE_NAME,
    HISTORY_NAME,
    CaptionDataset,
    PretrainConfig,
    PretrainHistory,
    ZeroShotEvaluator,
    ZeroShotSet,
    load_caption_dataset,
    plot_history,
    pretrain,
    resolve_caption_file,
    save_pretrained,
    world_zero_shot_sets,
)

__all__ = [
    "CURVE_NAME",
    "HISTORY_NAME",
    "MAX_LOGIT_SCALE",
    "OBJECTIVES",
    "CaptionDataset",
    "PretrainConfig",
    "PretrainHistory",
    "ZeroShotEvaluator",
    "ZeroShotSet",
    "clamp_logit_scale_",
    "clip_loss",
    "contrastive_logits",
    "itl_loss",
    "load_caption_dataset",
    "objective_loss",
    "plot_history",
    "pretrain",
    "resolve_caption_file",
    "same_label_targets",
    "save_pretrained",
    "world_zero_shot_sets",
]
